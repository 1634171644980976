//! End to end: the real `delegate-cp` and `delegate` binaries on loopback — mutual TLS 1.3,
//! Hello/Welcome, listing, refusals, reconnects, dead-peer detection, clean shutdown, bad frames.

use delegate_tests::certs::{self, try_connect};
use delegate_tests::docker::sandbox_image;
use delegate_tests::net::Relay;
use delegate_tests::process::{edit_toml, table};
use delegate_tests::{assert_eventually, ControlPlane, RunningAgent};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(60);

fn agent_env() -> Vec<(&'static str, &'static str)> {
    vec![("DELEGATE_SANDBOX__IMAGE", sandbox_image())]
}

fn start_agent(cp: &ControlPlane, name: &str) -> RunningAgent {
    RunningAgent::start(&cp.agent_dir(name).join("agent.toml"), name, &agent_env())
}

fn agent_addr(cp: &ControlPlane) -> SocketAddr {
    format!("127.0.0.1:{}", cp.agent_port).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_connects_and_is_listed_with_its_details() {
    let mut cp = ControlPlane::init(&["runner-1"], None);
    cp.start().await;
    let _agent = start_agent(&cp, "runner-1");
    assert_eventually!(WAIT, "runner-1 connected", {
        cp.agent_state("runner-1").as_deref() == Some("connected")
    });
    let a = cp.agent("runner-1").unwrap();
    assert_eq!(a["pool"], "default");
    assert!(a["version"].as_str().is_some_and(|v| !v.is_empty()), "{a}");
    assert!(a["labels"].is_object(), "{a}");
    assert!(!a["last_heartbeat"].is_null(), "{a}");
    assert!(!cp.audit_actions("agent.connected").is_empty());

    // Human output names the agent too.
    let out = cp.cli(&["agents"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("runner-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_certificates_and_tls12_are_audited_with_reasons() {
    let mut cp = ControlPlane::init(&["good"], None);
    cp.start().await;
    let addr = agent_addr(&cp);
    let ca_pem = std::fs::read_to_string(cp.path().join("tls/ca.pem")).unwrap();
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

    // The genuine bundle gets in (proves the refusals below are about the certificate).
    let good = certs::Issued {
        cert_pem: std::fs::read_to_string(cp.agent_dir("good").join("agent.pem")).unwrap(),
        key_pem: std::fs::read_to_string(cp.agent_dir("good").join("agent.key")).unwrap(),
    };
    assert!(
        try_connect(addr, certs::client_config(&ca_pem, Some(&good), tls13))
            .await
            .is_ok()
    );

    let other_ca = certs::new_ca("some other CA");
    let foreign = certs::client_cert(&other_ca, "intruder", false);
    let our_ca = certs::load_ca(cp.path());
    let expired = certs::client_cert(&our_ca, "old-agent", true);

    let cases: Vec<(&str, std::sync::Arc<rustls::ClientConfig>)> = vec![
        (
            "no client certificate",
            certs::client_config(&ca_pem, None, tls13),
        ),
        (
            "certificate from another CA",
            certs::client_config(&ca_pem, Some(&foreign), tls13),
        ),
        (
            "expired certificate",
            certs::client_config(&ca_pem, Some(&expired), tls13),
        ),
        (
            "TLS 1.2-only client",
            certs::client_config(&ca_pem, Some(&good), tls12),
        ),
    ];
    for (what, cfg) in cases {
        let res = try_connect(addr, cfg).await;
        assert!(res.is_err(), "{what}: the control plane let it in");
    }

    assert_eventually!(WAIT, "four refusals audited", {
        cp.audit_actions("agent.refused").len() >= 4
    });
    let reasons: Vec<String> = cp
        .audit_actions("agent.refused")
        .iter()
        .map(|r| r.to_string().to_lowercase())
        .collect();
    let has = |needles: &[&str]| {
        reasons
            .iter()
            .any(|r| needles.iter().any(|n| r.contains(n)))
    };
    assert!(
        has(&["no certificate", "no certificates"]),
        "no-cert reason missing: {reasons:#?}"
    );
    assert!(
        has(&["unknownissuer", "unknown issuer"]),
        "foreign CA reason missing: {reasons:#?}"
    );
    assert!(has(&["expired"]), "expiry reason missing: {reasons:#?}");
    assert!(
        has(&["version", "incompatible", "supportedversions"]),
        "TLS version reason missing: {reasons:#?}"
    );
    for name in ["intruder", "old-agent"] {
        assert!(cp.agent(name).is_none(), "{name} must never be listed");
    }
    assert!(cp.log().contains("refused"), "refusals are logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_refuses_a_tls12_only_server() {
    let cp = ControlPlane::init(&["picky"], None);
    let ca = certs::load_ca(cp.path());
    let server = certs::server_cert(&ca);
    let cfg = certs::server_config(&server, &[&rustls::version::TLS12]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let server_task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let r = acceptor
                .accept(tcp)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = tx.send(r);
        }
    });
    let config = cp.agent_dir("picky").join("agent.toml");
    edit_toml(&config, |doc| {
        table(doc, "control_plane").insert(
            "url".into(),
            toml::Value::String(format!("wss://127.0.0.1:{port}/v1/agent")),
        );
    });
    let agent = RunningAgent::start(&config, "picky", &agent_env());
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("agent never tried")
        .unwrap();
    assert!(
        first.is_err(),
        "a TLS 1.2-only server completed a handshake with the agent"
    );
    // Keep watching a few more attempts: none may succeed.
    for _ in 0..2 {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            assert!(
                r.is_err(),
                "a TLS 1.2-only server completed a handshake with the agent"
            );
        }
    }
    server_task.abort();
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_reconnects_after_control_plane_restart() {
    let mut cp = ControlPlane::init(&["steady"], Some(500));
    cp.start().await;
    let _agent = start_agent(&cp, "steady");
    assert_eventually!(
        WAIT,
        "connected",
        cp.agent_state("steady").as_deref() == Some("connected")
    );
    let before = cp.audit_actions("agent.connected").len();
    cp.stop(false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cp.start().await;
    assert_eventually!(WAIT, "reconnected after restart", {
        cp.agent_state("steady").as_deref() == Some("connected")
            && cp.audit_actions("agent.connected").len() > before
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_cleanly_exits_zero_and_shows_disconnected() {
    let mut cp = ControlPlane::init(&["leaver"], None);
    cp.start().await;
    let mut agent = start_agent(&cp, "leaver");
    assert_eventually!(
        WAIT,
        "connected",
        cp.agent_state("leaver").as_deref() == Some("connected")
    );
    agent.signal(libc::SIGTERM);
    let code = agent.wait(WAIT).expect("agent did not exit after SIGTERM");
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGTERM; log:\n{}",
        agent.log()
    );
    assert_eventually!(WAIT, "shown disconnected", {
        cp.agent_state("leaver").as_deref() == Some("disconnected")
    });
    assert!(!cp.audit_actions("agent.disconnected").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_peer_detected_on_a_blackholed_link_both_sides() {
    let mut cp = ControlPlane::init(&["island"], Some(500));
    cp.start().await;
    let relay = Relay::start(agent_addr(&cp)).await;
    let config = cp.agent_dir("island").join("agent.toml");
    edit_toml(&config, |doc| {
        let t = table(doc, "control_plane");
        t.insert(
            "url".into(),
            toml::Value::String(format!("wss://127.0.0.1:{}/v1/agent", relay.addr.port())),
        );
        t.insert("backoff_initial_ms".into(), toml::Value::Integer(100));
        t.insert("backoff_max_ms".into(), toml::Value::Integer(1000));
        t.insert("connect_timeout_ms".into(), toml::Value::Integer(2000));
    });
    let _agent = RunningAgent::start(&config, "island", &agent_env());
    assert_eventually!(
        WAIT,
        "connected",
        cp.agent_state("island").as_deref() == Some("connected")
    );
    let connects = cp.audit_actions("agent.connected").len();

    // TCP stays up, every byte vanishes: only heartbeats can tell.
    relay.set_blackhole(true);
    assert_eventually!(WAIT, "control plane notices the silent agent", {
        cp.agent_state("island").as_deref() == Some("disconnected")
    });
    relay.set_blackhole(false);
    // The agent must have given up on the dead connection by itself and dialled again.
    assert_eventually!(WAIT, "agent reconnects over a fresh connection", {
        cp.agent_state("island").as_deref() == Some("connected")
            && cp.audit_actions("agent.connected").len() > connects
    });
}

async fn next_json<S>(ws: &mut S) -> Value
where
    S: StreamExt<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no frame from the control plane")
            .expect("stream ended")
            .expect("websocket error");
        if let WsMessage::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] != "heartbeat" {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_get_errors_while_the_real_agent_keeps_being_served() {
    let mut cp = ControlPlane::init(&["real", "raw"], None);
    cp.start().await;
    let _agent = start_agent(&cp, "real");
    assert_eventually!(
        WAIT,
        "real agent connected",
        cp.agent_state("real").as_deref() == Some("connected")
    );

    let ca_pem = std::fs::read_to_string(cp.path().join("tls/ca.pem")).unwrap();
    let raw = certs::Issued {
        cert_pem: std::fs::read_to_string(cp.agent_dir("raw").join("agent.pem")).unwrap(),
        key_pem: std::fs::read_to_string(cp.agent_dir("raw").join("agent.key")).unwrap(),
    };
    let cfg = certs::client_config(&ca_pem, Some(&raw), &[&rustls::version::TLS13]);
    let mut ws = try_connect(agent_addr(&cp), cfg.clone()).await.unwrap();
    let hello = serde_json::json!({"type":"hello","versions":[1],"agent_version":"test","name":"raw",
        "pool":"default","labels":{},"slots":1,"tasks":[]});
    ws.send(WsMessage::text(hello.to_string())).await.unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["agent_id"], "raw");

    let bad: Vec<(WsMessage, &str)> = vec![
        (WsMessage::text("this is not json"), "malformed"),
        (WsMessage::text(r#"{"type":"launch_missiles"}"#), "unknown_type"),
        (WsMessage::text(r#"{"type":"heartbeat","ts_ms":1,"extra":true}"#), "malformed"),
        (
            WsMessage::text(
                serde_json::json!({"type":"reject","task_id":"6f1c2f5e-8d2a-4c1e-9b1a-1f0e2d3c4b5a",
                    "reason":"x".repeat(100_000)})
                .to_string(),
            ),
            "invalid_field",
        ),
        (WsMessage::text(format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, "y".repeat(2 * 1024 * 1024))), "too_large"),
        (WsMessage::binary(vec![0xAAu8; 10]), "malformed"),
        (WsMessage::binary(vec![0xD1u8, 9, 0, 0].into_iter().chain([0u8; 24]).collect::<Vec<u8>>()), "unknown_type"),
    ];
    for (frame, code) in bad {
        ws.send(frame).await.unwrap();
        let err = next_json(&mut ws).await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["code"], code, "{err}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{err}"
        );
    }
    // The connection still works after all that.
    ws.send(WsMessage::text(r#"{"type":"heartbeat","ts_ms":5}"#))
        .await
        .unwrap();
    assert_eq!(cp.agent_state("raw").as_deref(), Some("connected"));

    // A message over the WebSocket limit ends that connection, and only that one.
    let huge = vec![0u8; delegate_protocol::limits::MAX_WS_MESSAGE + 1024];
    let _ = ws.send(WsMessage::binary(huge)).await;
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return true,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        closed.unwrap_or(false),
        "oversized message did not close the connection"
    );

    assert_eq!(
        cp.agent_state("real").as_deref(),
        Some("connected"),
        "real agent disturbed"
    );
    // And the server still accepts new connections.
    let mut again = try_connect(agent_addr(&cp), cfg).await.unwrap();
    again
        .send(WsMessage::text(hello.to_string()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut again).await["type"], "welcome");
}
