//! End to end: enrollment and the certificate lifecycle with the real `delegate-cp` and `delegate`
//! binaries on loopback (docs/enrollment.md).
//!
//! - `tokens create --json` → `delegate enroll` → `delegate run` with the written bundle connects;
//!   a used token and an unknown one are refused with the control plane's message, and audited;
//! - renewal: an agent whose certificate is past two thirds of its life gets a new one over the
//!   live link (the connection stays), and connects with it next time;
//! - revocation: `agents revoke` disconnects the agent and refuses it from then on;
//! - `enroll --if-absent` on an enrolled directory exits 0 without sending anything: the files stay
//!   as they were and the token keeps its unused use.
//!
//! These need the control plane's side of enrollment (`tokens create`, the enrollment endpoint,
//! `renew_request` handling, `agents revoke`). A control plane binary without a command prints a
//! loud note and that part is not run; the test does not pretend it passed it.

use delegate_tests::{assert_eventually, ControlPlane, RunningAgent};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn has_command(cp: &ControlPlane, args: &[&str]) -> bool {
    let mut a = args.to_vec();
    a.push("--help");
    let ok = cp.cli(&a).status.success();
    if !ok {
        eprintln!(
            "NOTE: `delegate-cp {}` is not available in this build; this part of the enrollment e2e test did not run",
            args.join(" ")
        );
    }
    ok
}

fn enroll(url: &str, token: &str, hash: &str, name: &str, out: &Path) -> Output {
    Command::new(delegate_tests::process::bin("delegate"))
        .args([
            "enroll",
            "--url",
            url,
            "--token",
            token,
            "--ca-sha256",
            hash,
        ])
        .args(["--name", name, "--out"])
        .arg(out)
        .env_remove("DELEGATE_ENROLL_TOKEN")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// No Docker for these agents: tasks are not the point, the identity is.
fn agent_env() -> Vec<(&'static str, &'static str)> {
    vec![("DOCKER_HOST", "unix:///nonexistent/docker.sock")]
}

#[tokio::test(flavor = "multi_thread")]
async fn token_enrollment_then_run_and_refused_tokens() {
    let mut cp = ControlPlane::init(&[], Some(300));
    cp.start().await;
    if !has_command(&cp, &["tokens", "create"]) {
        return;
    }
    let t = cp.cli_json(&[
        "tokens", "create", "--pool", "edge", "--ttl", "1h", "--uses", "1", "--json",
    ]);
    let (token, url, hash) = (
        t["token"].as_str().unwrap().to_string(),
        t["url"].as_str().unwrap().to_string(),
        t["ca_sha256"].as_str().unwrap().to_string(),
    );
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("tls");
    let o = enroll(&url, &token, &hash, "enrolled-1", &out);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains(&token),
        "the token is echoed: {}",
        text(&o)
    );

    let mut agent = RunningAgent::start(&out.join("agent.toml"), "enrolled-1", &agent_env());
    assert_eventually!(WAIT, "the enrolled agent connects", {
        cp.agent_state("enrolled-1").as_deref() == Some("connected")
    });
    assert_eq!(
        cp.agent("enrolled-1").unwrap()["pool"].as_str(),
        Some("edge")
    );

    // The token is used up; an unknown one is unknown. Nothing is written for either.
    let used = enroll(&url, &token, &hash, "enrolled-2", &work.path().join("b"));
    assert_eq!(used.status.code(), Some(1), "{}", text(&used));
    assert!(text(&used).contains("HTTP 410"), "{}", text(&used));
    assert!(!work.path().join("b").exists());
    let unknown = enroll(
        &url,
        "no-such-token",
        &hash,
        "enrolled-3",
        &work.path().join("c"),
    );
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown));
    assert!(text(&unknown).contains("HTTP 401"), "{}", text(&unknown));
    // A wrong CA hash never reaches the endpoint.
    let wrong = enroll(
        &url,
        &token,
        &"ab".repeat(32),
        "enrolled-4",
        &work.path().join("d"),
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(text(&wrong).contains("--ca-sha256"), "{}", text(&wrong));
    // Every attempt that reached the control plane is audited (the wrong hash never did).
    assert_eq!(
        cp.audit_actions("agent.enrolled").len(),
        1,
        "{:#?}",
        cp.audit()
    );
    assert_eq!(
        cp.audit_actions("token.refused").len(),
        2,
        "{:#?}",
        cp.audit()
    );

    // Revocation: disconnected at once and refused from then on.
    if has_command(&cp, &["agents", "revoke"]) {
        let o = cp.cli(&["agents", "revoke", "enrolled-1"]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eventually!(WAIT, "the revoked agent is disconnected", {
            cp.agent_state("enrolled-1").as_deref() != Some("connected")
        });
        // It keeps trying (with backoff) and keeps being refused.
        assert_eventually!(WAIT, "the agent logs the refusal", {
            let log = agent.log();
            log.matches("cannot connect to the control plane").count()
                + log.matches("connection to the control plane lost").count()
                >= 2
        });
        assert_ne!(cp.agent_state("enrolled-1").as_deref(), Some("connected"));
        let doctor = Command::new(delegate_tests::process::bin("delegate"))
            .args(["doctor", "--json", "--config"])
            .arg(out.join("agent.toml"))
            .envs(agent_env())
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
        let cp_check = v
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "control plane")
            .unwrap()
            .clone();
        assert_eq!(cp_check["level"], "fail", "{cp_check}");
    }
    agent.signal(libc::SIGTERM);
    let _ = agent.wait(WAIT);
}

/// `enroll --if-absent` on a directory that already holds an identity (an init container or a
/// provisioning script running again): exit 0, the files untouched, nothing sent, so the token's
/// second use is still there; without the flag the same call is refused and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn enroll_if_absent_keeps_the_identity_and_does_not_spend_the_token() {
    let mut cp = ControlPlane::init(&[], Some(300));
    cp.start().await;
    if !has_command(&cp, &["tokens", "create"]) {
        return;
    }
    let t = cp.cli_json(&[
        "tokens", "create", "--pool", "edge", "--ttl", "1h", "--uses", "2", "--json",
    ]);
    let (token, url, hash) = (
        t["token"].as_str().unwrap().to_string(),
        t["url"].as_str().unwrap().to_string(),
        t["ca_sha256"].as_str().unwrap().to_string(),
    );
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("tls");
    let enroll_if_absent = |name: &str, dir: &Path| -> Output {
        Command::new(delegate_tests::process::bin("delegate"))
            .args(["enroll", "--if-absent", "--url", &url, "--token", &token])
            .args(["--ca-sha256", &hash, "--name", name, "--out"])
            .arg(dir)
            .env_remove("DELEGATE_ENROLL_TOKEN")
            .output()
            .unwrap()
    };
    // An empty directory: --if-absent enrolls as usual (first use of the token).
    let o = enroll_if_absent("absent-1", &out);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("enrolled as absent-1"), "{}", text(&o));
    let files = ["agent.key", "agent.pem", "ca.pem", "agent.toml"];
    let snapshot = || -> Vec<(Vec<u8>, std::time::SystemTime)> {
        files
            .iter()
            .map(|f| {
                let p = out.join(f);
                (
                    std::fs::read(&p).unwrap(),
                    std::fs::metadata(&p).unwrap().modified().unwrap(),
                )
            })
            .collect()
    };
    let before = snapshot();

    // Again, same token and directory: already enrolled, exit 0, nothing written or sent.
    let again = enroll_if_absent("absent-1", &out);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        text(&again).contains("already enrolled"),
        "{}",
        text(&again)
    );
    assert!(!text(&again).contains(&token), "{}", text(&again));
    assert!(
        snapshot() == before,
        "--if-absent changed the identity files"
    );
    // Without the flag: refused as a usage error (2), files unchanged.
    let refused = enroll(&url, &token, &hash, "absent-1", &out);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("already exists") && text(&refused).contains("--if-absent"),
        "{}",
        text(&refused)
    );
    assert!(snapshot() == before);
    // Neither reached the control plane: one enrollment, no refusal audited ...
    assert_eq!(
        cp.audit_actions("agent.enrolled").len(),
        1,
        "{:#?}",
        cp.audit()
    );
    assert_eq!(
        cp.audit_actions("token.refused").len(),
        0,
        "{:#?}",
        cp.audit()
    );
    // ... and the token's second use is still there for another host.
    let second = enroll(&url, &token, &hash, "absent-2", &work.path().join("b"));
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(
        cp.audit_actions("agent.enrolled").len(),
        2,
        "{:#?}",
        cp.audit()
    );
    // Now it is used up; --if-absent on the enrolled directory still succeeds without it.
    let used = enroll(&url, &token, &hash, "absent-3", &work.path().join("c"));
    assert_eq!(used.status.code(), Some(1), "{}", text(&used));
    assert!(text(&used).contains("HTTP 410"), "{}", text(&used));
    let o = enroll_if_absent("absent-1", &out);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(snapshot() == before);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_is_renewed_over_the_live_link() {
    let mut cp = ControlPlane::init(&["renew-1"], Some(300));
    cp.start().await;
    if !has_command(&cp, &["tokens", "create"]) {
        // The control plane answers renew_request in the same change as enrollment.
        return;
    }
    // Replace the agent's certificate by one of the control plane's CA that is past two thirds
    // of its life (issued 3 days ago for 4), for the same key.
    let dir = cp.agent_dir("renew-1");
    let key_pem = std::fs::read_to_string(dir.join("agent.key")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let ca = delegate_tests::certs::load_ca(cp.path());
    let mut p = rcgen::CertificateParams::new(vec!["renew-1".to_string()]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "renew-1");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let day = Duration::from_secs(86400);
    let now = std::time::SystemTime::now();
    p.not_before = (now - day * 3).into();
    p.not_after = (now + day).into();
    let old = p.signed_by(&key, &ca.0, &ca.1).unwrap().pem();
    std::fs::write(dir.join("agent.pem"), &old).unwrap();

    let mut agent = RunningAgent::start(&dir.join("agent.toml"), "renew-1", &agent_env());
    assert_eventually!(WAIT, "the agent connects", {
        cp.agent_state("renew-1").as_deref() == Some("connected")
    });
    assert_eventually!(WAIT, "the certificate file is renewed", {
        std::fs::read_to_string(dir.join("agent.pem")).unwrap() != old
    });
    assert!(
        agent.log().contains("client certificate renewed"),
        "{}",
        agent.log()
    );
    // The key did not change, the connection did not drop.
    assert_eq!(
        std::fs::read_to_string(dir.join("agent.key")).unwrap(),
        key_pem
    );
    assert!(
        !agent.log().contains("connection to the control plane lost"),
        "{}",
        agent.log()
    );
    // A restarted agent connects with the renewed certificate.
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(WAIT).is_some());
    assert_eventually!(WAIT, "the agent is seen disconnected", {
        cp.agent_state("renew-1").as_deref() != Some("connected")
    });
    let mut again = RunningAgent::start(&dir.join("agent.toml"), "renew-1", &agent_env());
    assert_eventually!(WAIT, "the agent reconnects with the new certificate", {
        cp.agent_state("renew-1").as_deref() == Some("connected")
    });
    again.signal(libc::SIGTERM);
    let _ = again.wait(WAIT);
}
