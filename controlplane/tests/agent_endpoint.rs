//! The agent endpoint end to end, in process: `init` into a temp dir, `serve::start`, and a raw
//! tokio-rustls + tokio-tungstenite client using the generated agent bundle.

mod common;

use common::*;
use delegate_controlplane::api::StatusView;
use delegate_controlplane::pki::{Ca, Validity};
use delegate_protocol::{ErrorCode, Heartbeat, HeldTask, Message};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_welcome_heartbeat_and_bad_frames() {
    let env = Env::new(200).await;
    let mut ws = connect(&env, "a1").await;
    // The name in Hello is a claim; identity comes from the certificate.
    let mut h = hello("somebody-else", vec![1]);
    if let Message::Hello(h) = &mut h {
        h.tasks = vec![HeldTask {
            task_id: uuid::Uuid::from_u128(42),
            acked_seq: 3,
        }];
    }
    send(&mut ws, &h).await;
    let Some(Message::Welcome(w)) = recv(&mut ws, true).await else {
        panic!("expected welcome")
    };
    assert_eq!(w.agent_id, "a1");
    assert_eq!(w.version, 1);
    assert_eq!(w.heartbeat_interval_ms, 200);
    assert_eq!(w.resume.len(), 1);
    assert!(!w.resume[0].known, "an unknown task is not known");

    // The server heartbeats on its own.
    assert!(matches!(
        recv(&mut ws, false).await,
        Some(Message::Heartbeat(_))
    ));

    let agents = env.agents().await;
    let a1 = agents.iter().find(|a| a.name == "a1").unwrap();
    assert_eq!(a1.state, "connected");
    assert_eq!(a1.version, "9.9.9");
    assert_eq!(a1.labels.get("os").map(String::as_str), Some("linux"));
    assert!(a1.last_heartbeat.is_some());

    // Undecodable frames get an error each; the connection stays up.
    let bad: Vec<(WsMessage, ErrorCode)> = vec![
        (WsMessage::text("not json"), ErrorCode::Malformed),
        (
            WsMessage::text(r#"{"type":"bogus"}"#),
            ErrorCode::UnknownType,
        ),
        (
            WsMessage::text(r#"{"type":"heartbeat","ts_ms":1,"x":1}"#),
            ErrorCode::Malformed,
        ),
        (WsMessage::binary(vec![0u8; 10]), ErrorCode::Malformed),
        (WsMessage::binary(vec![0xD1, 9, 0, 0]), ErrorCode::Malformed),
    ];
    let n = bad.len() as u64;
    for (frame, code) in bad {
        ws.send(frame).await.unwrap();
        match recv(&mut ws, true).await {
            Some(Message::Error(e)) => assert_eq!(e.code, code, "{}", e.message),
            other => panic!("expected error, got {other:?}"),
        }
    }
    // A message an agent must not send is a protocol violation, not a decode error.
    send(&mut ws, &hello("a1", vec![1])).await;
    match recv(&mut ws, true).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::ProtocolViolation),
        other => panic!("expected error, got {other:?}"),
    }
    send(&mut ws, &Message::Heartbeat(Heartbeat { ts_ms: 1 })).await;
    assert!(matches!(
        recv(&mut ws, false).await,
        Some(Message::Heartbeat(_))
    ));
    let status: StatusView = env.api().get_json("/api/v1/status").await.unwrap();
    assert!(status.decode_errors >= n, "{status:?}");
    assert_eq!(status.agents_connected, 1);

    // Closing the socket shows the agent disconnected, with the reason audited.
    ws.close(None).await.unwrap();
    env.wait_agent_state("a1", "disconnected").await;
    let r = env.wait_audit(|r| r.action == "agent.disconnected").await;
    assert!(r.detail.contains("closed by the agent"), "{}", r.detail);
    assert!(env
        .audit()
        .await
        .iter()
        .any(|r| r.action == "agent.connected" && r.who == "a1"));
    env.running.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_dropped_after_three_intervals() {
    let env = Env::new(100).await;
    let mut ws = connect(&env, "a1").await;
    send(&mut ws, &hello("a1", vec![1])).await;
    assert!(matches!(
        recv(&mut ws, true).await,
        Some(Message::Welcome(_))
    ));
    // Read only (the server's heartbeats) and never send: a blackholed agent.
    while recv(&mut ws, false).await.is_some() {}
    let r = env.wait_audit(|r| r.action == "agent.disconnected").await;
    assert!(r.detail.contains("3 heartbeat intervals"), "{}", r.detail);
    env.wait_agent_state("a1", "disconnected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_replaces_first() {
    let env = Env::new(5000).await;
    let mut first = connect(&env, "a1").await;
    send(&mut first, &hello("a1", vec![1])).await;
    assert!(matches!(
        recv(&mut first, true).await,
        Some(Message::Welcome(_))
    ));
    let mut second = connect(&env, "a1").await;
    send(&mut second, &hello("a1", vec![1])).await;
    assert!(matches!(
        recv(&mut second, true).await,
        Some(Message::Welcome(_))
    ));
    // The first is closed by the server.
    assert!(recv(&mut first, true).await.is_none());
    let r = env.wait_audit(|r| r.action == "agent.disconnected").await;
    assert!(r.detail.contains("replaced"), "{}", r.detail);
    // The agent stays connected through its second connection.
    assert_eq!(
        env.agents()
            .await
            .iter()
            .find(|a| a.name == "a1")
            .unwrap()
            .state,
        "connected"
    );
    send(&mut second, &Message::Heartbeat(Heartbeat { ts_ms: 1 })).await;
    env.running.unwrap().shutdown().await;
    assert!(recv(&mut second, true).await.is_none());
    let env_dd = env.dd.clone();
    let store = delegate_controlplane::store::Store::open(
        &env_dd.db(),
        delegate_controlplane::at_rest::AtRest::default(),
    )
    .unwrap();
    assert!(store
        .agents()
        .unwrap()
        .iter()
        .all(|a| a.state == "disconnected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_version_is_refused_with_a_message() {
    let env = Env::new(5000).await;
    let mut ws = connect(&env, "a2").await;
    send(&mut ws, &hello("a2", vec![7, 8])).await;
    match recv(&mut ws, true).await {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("[7, 8]"), "{}", e.message);
        }
        other => panic!("expected error, got {other:?}"),
    }
    assert!(recv(&mut ws, true).await.is_none(), "connection closed");
    let r = env.wait_audit(|r| r.action == "agent.refused").await;
    assert!(
        r.detail.contains("no common protocol version"),
        "{}",
        r.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_version_offer_is_a_probe_not_a_refusal() {
    let env = Env::new(5000).await;
    let mut ws = connect(&env, "a1").await;
    send(&mut ws, &hello("a1", vec![])).await;
    match recv(&mut ws, true).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::UnsupportedVersion),
        other => panic!("expected error, got {other:?}"),
    }
    let r = env.wait_audit(|r| r.action == "agent.probed").await;
    assert_eq!(r.target, "a1");
    assert!(r.detail.contains("delegate doctor"), "{}", r.detail);
    assert!(
        env.audit()
            .await
            .iter()
            .all(|r| r.action != "agent.refused"),
        "a probe is not audited as a refusal"
    );
}

/// A refused handshake fails on the client (at TLS or at the WebSocket upgrade, TLS 1.3 lets a
/// client finish before the server has checked its certificate) and is audited with the reason.
async fn assert_refused(env: &Env, config: rustls::ClientConfig, reason_part: &str) {
    let r = connect_with(env.agent_addr(), config, "/v1/agent").await;
    assert!(r.is_err(), "connection should be refused");
    let rec = env
        .wait_audit(|r| r.action == "agent.refused" && r.detail.contains(reason_part))
        .await;
    assert!(rec.target.starts_with("127.0.0.1:"), "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes() {
    let env = Env::new(5000).await;
    let ca = env.dd.ca_cert();

    // TLS 1.2 only.
    let (cert, key) = env.bundle("a1");
    let cfg = client_config(&ca, Some((&cert, &key)), &rustls::version::TLS12);
    assert_refused(&env, cfg, "peer is incompatible").await;

    // No client certificate.
    let cfg = client_config(&ca, None, &rustls::version::TLS13);
    assert_refused(&env, cfg, "peer sent no certificates").await;

    // A certificate from another CA.
    let other = Ca::generate("other CA").unwrap();
    let issued = other.issue_agent("a1", Validity::days(30)).unwrap();
    let cfg = client_config(
        &ca,
        Some((&issued.cert_pem, &issued.key_pem)),
        &rustls::version::TLS13,
    );
    assert_refused(&env, cfg, "UnknownIssuer").await;

    // An expired certificate from the right CA.
    let real = Ca::load(
        &std::fs::read_to_string(env.dd.ca_cert()).unwrap(),
        &std::fs::read_to_string(env.dd.ca_key()).unwrap(),
    )
    .unwrap();
    let expired = real
        .issue_agent(
            "a1",
            Validity {
                from_days: -30,
                until_days: -2,
            },
        )
        .unwrap();
    let cfg = client_config(
        &ca,
        Some((&expired.cert_pem, &expired.key_pem)),
        &rustls::version::TLS13,
    );
    assert_refused(&env, cfg, "expired").await;

    // The right certificate on the wrong path.
    let cfg = client_config(&ca, Some((&cert, &key)), &rustls::version::TLS13);
    assert!(connect_with(env.agent_addr(), cfg, "/other").await.is_err());
    env.wait_audit(|r| r.action == "agent.refused" && r.detail.contains("WebSocket upgrade"))
        .await;

    // None of them got in; the real agent still does.
    assert!(env.agents().await.is_empty());
    let mut ws = connect(&env, "a1").await;
    send(&mut ws, &hello("a1", vec![1])).await;
    assert!(matches!(
        recv(&mut ws, true).await,
        Some(Message::Welcome(_))
    ));
    let status: StatusView = env.api().get_json("/api/v1/status").await.unwrap();
    assert!(status.refused_handshakes >= 5, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_the_token_and_tls13() {
    let env = Env::new(5000).await;
    let api_addr = env.running.as_ref().unwrap().api_addr;
    let ca = env.dd.ca_cert();
    // Wrong token.
    let tls = client_config(&ca, None, &rustls::version::TLS13);
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{}/api/v1/agents", api_addr.port());
    let resp = http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // TLS 1.2 refused on the API too.
    let tls = client_config(&ca, None, &rustls::version::TLS12);
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let token = std::fs::read_to_string(env.dd.api_token()).unwrap();
    assert!(http
        .get(&url)
        .bearer_auth(token.trim())
        .send()
        .await
        .is_err());
    // The CLI's client works.
    let out = delegate_controlplane::cli::agents(&env.api(), true)
        .await
        .unwrap();
    assert_eq!(out.trim(), "[]");
}
