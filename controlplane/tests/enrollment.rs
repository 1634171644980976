//! Enrollment and the certificate lifecycle, in process: bootstrap tokens, `POST /api/v1/enroll`
//! (no bearer token), the issued certificate on the agent endpoint, renewal over the live link,
//! revocation (live connection closed, later connections refused), and the CLI binary's
//! `tokens` / `agents revoke` commands.

mod common;

use common::*;
use delegate_controlplane::api::AgentView;
use delegate_controlplane::config::CpConfig;
use delegate_controlplane::enroll::{EnrollRequest, EnrollResponse};
use delegate_controlplane::revoke::RevokeView;
use delegate_controlplane::tokens::{CreateTokenRequest, TokenView};
use delegate_protocol::{ErrorCode, Hello, Message, RenewRequest};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The agent side's key and CSR, made as `delegate enroll` would.
struct AgentKey {
    key: rcgen::KeyPair,
}

impl AgentKey {
    fn new() -> Self {
        AgentKey {
            key: rcgen::KeyPair::generate().unwrap(),
        }
    }

    fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A CSR for this key; `cn` None leaves the subject empty.
    fn csr(&self, cn: Option<&str>) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.serialize_request(&self.key).unwrap().pem().unwrap()
    }
}

struct Cert {
    cn: String,
    serial: String,
    not_before: i64,
    not_after: i64,
    client_auth: bool,
    public_key: Vec<u8>,
}

fn parse_cert(pem: &str) -> Cert {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let client_auth = c
        .extended_key_usage()
        .unwrap()
        .map(|e| e.value.client_auth)
        .unwrap_or(false);
    let cert = Cert {
        cn,
        serial: hex::encode(c.raw_serial()),
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        client_auth,
        public_key: c.public_key().raw.to_vec(),
    };
    cert
}

async fn env_with_ttl(ttl: &str) -> Env {
    Env::with_config(CpConfig {
        agent_cert_ttl: ttl.into(),
        ..CpConfig::default()
    })
    .await
}

/// `tokens create --json` through the CLI function; returns the printed JSON.
async fn create_token(env: &Env, req: CreateTokenRequest) -> serde_json::Value {
    let out = delegate_controlplane::tokens::cli_create(&env.api(), &req, true)
        .await
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

async fn token(env: &Env, pool: &str, uses: u32) -> serde_json::Value {
    create_token(
        env,
        CreateTokenRequest {
            pool: Some(pool.into()),
            uses: Some(uses),
            ..Default::default()
        },
    )
    .await
}

/// An HTTPS client like the agent's: TLS 1.3, trusting the CA, no bearer token.
fn anonymous_http(env: &Env) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(
            &env.dd.ca_cert(),
            None,
            &rustls::version::TLS13,
        ))
        .build()
        .unwrap()
}

/// `POST {url}/api/v1/enroll`; the status and the JSON body.
async fn enroll_raw(env: &Env, url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let resp = anonymous_http(env)
        .post(format!("{url}/api/v1/enroll"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn enroll(
    env: &Env,
    token: &serde_json::Value,
    key: &AgentKey,
    name: Option<&str>,
    csr_cn: Option<&str>,
) -> (u16, serde_json::Value) {
    let req = EnrollRequest {
        token: token["token"].as_str().unwrap().into(),
        csr_pem: key.csr(csr_cn),
        name: name.map(Into::into),
    };
    enroll_raw(
        env,
        token["url"].as_str().unwrap(),
        &serde_json::to_value(&req).unwrap(),
    )
    .await
}

fn hello_in(name: &str, pool: &str) -> Message {
    Message::Hello(Hello {
        versions: vec![1],
        agent_version: "9.9.9".into(),
        name: name.into(),
        pool: pool.into(),
        labels: BTreeMap::new(),
        slots: 1,
        tasks: vec![],
    })
}

async fn connect_cert(env: &Env, cert_pem: &str, key_pem: &str) -> Ws {
    let cfg = client_config(
        &env.dd.ca_cert(),
        Some((cert_pem, key_pem)),
        &rustls::version::TLS13,
    );
    connect_with(env.agent_addr(), cfg, "/v1/agent")
        .await
        .unwrap()
}

/// Connect, say hello in `pool`, expect Welcome.
async fn join(env: &Env, cert_pem: &str, key_pem: &str, pool: &str) -> Ws {
    let mut ws = connect_cert(env, cert_pem, key_pem).await;
    let name = parse_cert(cert_pem).cn;
    send(&mut ws, &hello_in(&name, pool)).await;
    match recv(&mut ws, true).await {
        Some(Message::Welcome(w)) => assert_eq!(w.agent_id, name),
        other => panic!("expected welcome, got {other:?}"),
    }
    ws
}

/// The next message is `error{unauthorized}` containing `text`, then the server closes.
async fn expect_unauthorized(ws: &mut Ws, text: &str) {
    match recv(ws, true).await {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthorized, "{}", e.message);
            assert!(e.message.contains(text), "{}", e.message);
        }
        other => panic!("expected an unauthorized error, got {other:?}"),
    }
    assert!(recv(ws, true).await.is_none(), "closed after the error");
}

async fn agent_state(env: &Env, name: &str) -> Option<AgentView> {
    let out = delegate_controlplane::cli::agents(&env.api(), true)
        .await
        .unwrap();
    let agents: Vec<AgentView> = serde_json::from_str(&out).unwrap();
    agents.into_iter().find(|a| a.name == name)
}

fn sha256_hex_of(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_connect_renew_revoke() {
    let env = env_with_ttl("2h").await;
    let running = env.running.as_ref().unwrap();
    let t = token(&env, "pool-a", 1).await;

    // What `enroll` needs: the API URL, the token, the CA hash.
    let value = t["token"].as_str().unwrap();
    assert_eq!(value.len(), 64);
    assert_eq!(
        t["url"].as_str().unwrap(),
        format!("https://127.0.0.1:{}", running.api_addr.port())
    );
    let ca_der = delegate_controlplane::tls::load_certs(&env.dd.ca_cert()).unwrap();
    let ca_sha256 = t["ca_sha256"].as_str().unwrap();
    assert_eq!(ca_sha256, sha256_hex_of(ca_der[0].as_ref()));
    // The API presents the CA in its chain, so an agent pinning that hash finds it.
    let tcp = tokio::net::TcpStream::connect(running.api_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(
        &env.dd.ca_cert(),
        None,
        &rustls::version::TLS13,
    )))
    .connect(
        rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
        tcp,
    )
    .await
    .unwrap();
    let chain = tls.get_ref().1.peer_certificates().unwrap();
    assert!(
        chain.iter().any(|c| sha256_hex_of(c.as_ref()) == ca_sha256),
        "CA not in the presented chain"
    );
    drop(tls);

    // Enroll: the name asked for wins over the CSR's CN.
    let key = AgentKey::new();
    let (status, body) = enroll(&env, &t, &key, Some("e1"), Some("cn-ignored")).await;
    assert_eq!(status, 200, "{body}");
    let resp: EnrollResponse = serde_json::from_value(body).unwrap();
    assert_eq!(resp.name, "e1");
    assert_eq!(resp.pool, "pool-a");
    assert_eq!(
        resp.agent_url,
        format!("wss://127.0.0.1:{}/v1/agent", env.agent_addr().port())
    );
    assert_eq!(
        resp.ca_pem,
        std::fs::read_to_string(env.dd.ca_cert()).unwrap()
    );
    let cert = parse_cert(&resp.cert_pem);
    assert_eq!(cert.cn, "e1");
    assert!(cert.client_auth);
    assert_eq!(
        cert.public_key,
        key.key.public_key_der(),
        "issued for the agent's own key"
    );
    assert_eq!(
        cert.not_after - cert.not_before,
        2 * 3600 + 300,
        "agent_cert_ttl plus the clock-skew margin"
    );
    env.wait_audit(|r| {
        r.action == "agent.enrolled" && r.target == "e1" && r.detail.contains("pool-a")
    })
    .await;
    let used = env
        .wait_audit(|r| r.action == "token.used" && r.detail.contains("e1"))
        .await;
    assert!(
        !used.detail.contains(value),
        "token values never reach the audit trail"
    );

    // A one-use token is spent.
    let (status, body) = enroll(&env, &t, &AgentKey::new(), Some("e2"), None).await;
    assert_eq!(status, 410, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("already used"), "{msg}");
    let refused = env
        .wait_audit(|r| r.action == "token.refused" && r.detail.contains("already used"))
        .await;
    assert_eq!(refused.target, used.target, "audited against the token id");
    let tokens: Vec<TokenView> = env.api().get_json("/api/v1/tokens").await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!((tokens[0].state.as_str(), tokens[0].used), ("used", 1));

    // The issued certificate gets in, as its CN.
    let mut ws = join(&env, &resp.cert_pem, &key.key_pem(), "pool-a").await;
    let a = agent_state(&env, "e1").await.unwrap();
    assert_eq!((a.state.as_str(), a.pool.as_str()), ("connected", "pool-a"));

    // Renewal over the live link: same key, CSR names someone else, answer is for e1 and lasts
    // longer. X.509 times have whole seconds: let the clock pass the enrollment's second.
    let issued_at = cert.not_before + 300;
    while (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64)
        <= issued_at
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Renewals are spaced: with a renewal on record "just now" (dated ahead, so no clock can
    // make it old), the request is refused and the link stays up.
    let db = rusqlite::Connection::open(env.dd.db()).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute(
        "INSERT INTO agent_certs (serial, name, kind, issued_at_ms, not_after_ms)
         VALUES ('00', 'e1', 'renew', 9999999999999, 9999999999999)",
        [],
    )
    .unwrap();
    send(
        &mut ws,
        &Message::RenewRequest(RenewRequest {
            csr_pem: key.csr(Some("admin")),
        }),
    )
    .await;
    match recv(&mut ws, true).await {
        Some(Message::Error(e)) => assert!(e.message.contains("ask again"), "{}", e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
    env.wait_audit(|r| r.action == "agent.renew_refused" && r.target == "e1")
        .await;
    db.execute("DELETE FROM agent_certs WHERE serial = '00'", [])
        .unwrap();
    send(
        &mut ws,
        &Message::RenewRequest(RenewRequest {
            csr_pem: key.csr(Some("admin")),
        }),
    )
    .await;
    let renewed = match recv(&mut ws, true).await {
        Some(Message::RenewResponse(r)) => r,
        other => panic!("expected renew_response, got {other:?}"),
    };
    assert_eq!(renewed.ca_pem, None);
    let new = parse_cert(&renewed.cert_pem);
    assert_eq!(new.cn, "e1", "the connection's identity, not the CSR's");
    assert!(new.not_after > cert.not_after);
    assert_ne!(new.serial, cert.serial);
    assert_eq!(new.public_key, cert.public_key);
    env.wait_audit(|r| {
        r.action == "agent.renewed" && r.target == "e1" && r.detail.contains(&new.serial)
    })
    .await;

    // The renewed certificate connects (the old connection is replaced).
    let mut ws2 = join(&env, &renewed.cert_pem, &key.key_pem(), "pool-a").await;
    assert!(recv(&mut ws, true).await.is_none(), "replaced");

    // Revoke: the live connection is told and closed at once.
    let out = delegate_controlplane::revoke::cli_revoke(&env.api(), "e1", true)
        .await
        .unwrap();
    let v: RevokeView = serde_json::from_str(&out).unwrap();
    assert_eq!(v.state, "revoked");
    assert!(!v.already_revoked);
    assert!(v.disconnected.is_some(), "{v:?}");
    expect_unauthorized(&mut ws2, "agent e1 is revoked").await;
    env.wait_audit(|r| r.action == "agent.revoked" && r.target == "e1")
        .await;
    env.wait_agent_state("e1", "revoked").await;

    // And refused thereafter, with either certificate, before its Hello is even read.
    for pem in [&renewed.cert_pem, &resp.cert_pem] {
        let mut ws = connect_cert(&env, pem, &key.key_pem()).await;
        expect_unauthorized(&mut ws, "agent e1 is revoked").await;
    }
    let r = env
        .wait_audit(|r| r.action == "agent.refused" && r.target == "e1")
        .await;
    assert!(r.detail.starts_with("revoked"), "{}", r.detail);
    assert_eq!(agent_state(&env, "e1").await.unwrap().state, "revoked");

    // Revoking again says so.
    let out = delegate_controlplane::revoke::cli_revoke(&env.api(), "e1", false)
        .await
        .unwrap();
    assert!(out.contains("already revoked"), "{out}");

    // The name can be enrolled again; only the new enrollment's certificate gets in.
    let t2 = token(&env, "pool-a", 1).await;
    let key2 = AgentKey::new();
    let (status, body) = enroll(&env, &t2, &key2, None, Some("e1")).await;
    assert_eq!(status, 200, "{body}");
    let resp2: EnrollResponse = serde_json::from_value(body).unwrap();
    assert_eq!(resp2.name, "e1", "name from the CSR's CN");
    let mut old = connect_cert(&env, &renewed.cert_pem, &key.key_pem()).await;
    expect_unauthorized(
        &mut old,
        "not issued to agent e1 under its current enrollment",
    )
    .await;
    let _ws3 = join(&env, &resp2.cert_pem, &key2.key_pem(), "pool-a").await;
    assert_eq!(agent_state(&env, "e1").await.unwrap().state, "connected");
    env.running.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_enrollments_are_clear_and_audited() {
    let env = env_with_ttl("24h").await;
    let t = token(&env, "pool-a", 5).await;
    let url = t["url"].as_str().unwrap().to_string();

    // A malformed body: 400 naming the field, never quoting the token.
    let (status, body) = enroll_raw(
        &env,
        &url,
        &serde_json::json!({"token": t["token"], "csr_pem": 5, "name": ["x"]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("at csr_pem:"), "{msg}");
    assert!(!msg.contains(t["token"].as_str().unwrap()), "{msg}");
    let (status, body) = enroll_raw(
        &env,
        &url,
        &serde_json::json!({"token": 7, "csr_pem": t["token"]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("at token:"), "{msg}");
    assert!(!msg.contains(t["token"].as_str().unwrap()), "{msg}");

    // Unknown token: 401, JSON error, audited without the value.
    let bogus = "f".repeat(64);
    let (status, body) = enroll_raw(
        &env,
        &url,
        &serde_json::json!({"token": bogus, "csr_pem": AgentKey::new().csr(Some("x1")), "name": "x1"}),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("unknown enrollment token"));
    let r = env
        .wait_audit(|r| r.action == "token.refused" && r.target == "unknown")
        .await;
    assert!(!r.detail.contains(&bogus));

    // Expired: 410.
    let expiring = token(&env, "pool-a", 1).await;
    let id = token_id(&env, &expiring).await;
    let db = rusqlite::Connection::open(env.dd.db()).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute(
        "UPDATE enroll_tokens SET expires_at_ms = 1000 WHERE id = ?1",
        [&id],
    )
    .unwrap();
    let (status, body) = enroll(&env, &expiring, &AgentKey::new(), Some("x2"), None).await;
    assert_eq!(status, 410, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    env.wait_audit(|r| {
        r.action == "token.refused" && r.target == id && r.detail.contains("expired")
    })
    .await;

    // Revoked: 410.
    let revoked = token(&env, "pool-a", 1).await;
    let rid = token_id(&env, &revoked).await;
    let out = delegate_controlplane::tokens::cli_revoke(&env.api(), &rid, false)
        .await
        .unwrap();
    assert!(out.contains("revoked"), "{out}");
    let (status, body) = enroll(&env, &revoked, &AgentKey::new(), Some("x3"), None).await;
    assert_eq!(status, 410, "{body}");
    assert!(body["error"].as_str().unwrap().contains("revoked"));

    // A name an init bundle holds: 409, the token keeps its uses.
    let (status, body) = enroll(&env, &t, &AgentKey::new(), Some("a1"), None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("agents revoke a1"));
    // Bad names, no name, bad CSR: 400.
    let (status, body) = enroll(&env, &t, &AgentKey::new(), Some("Bad/Name"), None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = enroll(&env, &t, &AgentKey::new(), None, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no agent name"));
    let (status, body) = enroll_raw(
        &env,
        &url,
        &serde_json::json!({"token": t["token"], "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "name": "x4"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("certificate signing request"));
    let (status, body) = enroll_raw(&env, &url, &serde_json::json!({"csr_pem": "x"})).await;
    assert_eq!(status, 400, "{body}");
    // None of those used the token.
    let tokens: Vec<TokenView> = env.api().get_json("/api/v1/tokens").await.unwrap();
    let main = tokens
        .iter()
        .find(|v| Some(v.id.as_str()) == t["id"].as_str())
        .unwrap();
    assert_eq!((main.used, main.state.as_str()), (0, "active"));
    // Listings never carry token values.
    let listing = delegate_controlplane::tokens::cli_list(&env.api(), true)
        .await
        .unwrap();
    assert!(!listing.contains(t["token"].as_str().unwrap()));
    assert!(
        listing.contains("\"expired\"") && listing.contains("\"revoked\""),
        "{listing}"
    );

    // Names are normalised to lower case, and the answer says so.
    let (status, body) = enroll(&env, &t, &AgentKey::new(), Some("Host-7"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "host-7");

    // A prefix token: names must start with it; without one, one is made from it.
    let p = create_token(
        &env,
        CreateTokenRequest {
            pool: Some("gpu".into()),
            uses: Some(3),
            name_prefix: Some("gpu-".into()),
            ..Default::default()
        },
    )
    .await;
    let (status, body) = enroll(&env, &p, &AgentKey::new(), Some("web-1"), None).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = enroll(&env, &p, &AgentKey::new(), None, None).await;
    assert_eq!(status, 200, "{body}");
    let made = body["name"].as_str().unwrap();
    assert!(made.starts_with("gpu-") && made.len() == 12, "{made}");

    // The operator routes still need the bearer token; enrollment does not.
    let resp = anonymous_http(&env)
        .get(format!("{url}/api/v1/tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Bad token requests are refused with every problem named.
    let err = delegate_controlplane::tokens::cli_create(
        &env.api(),
        &CreateTokenRequest {
            pool: Some("p".into()),
            ttl: Some("never".into()),
            uses: Some(0),
            name_prefix: None,
        },
        true,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("ttl") && err.contains("uses"), "{err}");
}

/// A token's id from the listing (the create JSON carries it too).
async fn token_id(env: &Env, t: &serde_json::Value) -> String {
    let id = t["id"].as_str().unwrap().to_string();
    let tokens: Vec<TokenView> = env.api().get_json("/api/v1/tokens").await.unwrap();
    assert!(tokens.iter().any(|v| v.id == id));
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_agent_stays_in_its_pool() {
    let env = env_with_ttl("24h").await;
    let t = token(&env, "pool-a", 1).await;
    let key = AgentKey::new();
    let (status, body) = enroll(&env, &t, &key, Some("p1"), None).await;
    assert_eq!(status, 200, "{body}");
    let resp: EnrollResponse = serde_json::from_value(body).unwrap();
    // Enrolled, never connected: listed as disconnected in its pool.
    let a = agent_state(&env, "p1").await.unwrap();
    assert_eq!(
        (a.state.as_str(), a.pool.as_str()),
        ("disconnected", "pool-a")
    );
    let mut ws = connect_cert(&env, &resp.cert_pem, &key.key_pem()).await;
    send(&mut ws, &hello_in("p1", "default")).await;
    expect_unauthorized(&mut ws, "enrolled in pool \"pool-a\"").await;
    let r = env
        .wait_audit(|r| r.action == "agent.refused" && r.target == "p1")
        .await;
    assert!(r.detail.starts_with("wrong pool"), "{}", r.detail);
    let _ws = join(&env, &resp.cert_pem, &key.key_pem(), "pool-a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_bundled_agent_and_the_cli() {
    let env = env_with_ttl("24h").await;
    let (cert, key) = env.bundle("a1");
    let mut ws = join(&env, &cert, &key, "default").await;

    // The binary, against the running in-process control plane (it reads listen.json).
    let cp = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_delegate-cp"))
            .args(args)
            .env("DELEGATE_CP_DATA_DIR", &env.dd.root)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cp(&[
        "tokens", "create", "--pool", "ci", "--ttl", "30m", "--uses", "2", "--json",
    ]);
    assert!(ok, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        t["token"].is_string() && t["url"].is_string() && t["ca_sha256"].is_string(),
        "{t}"
    );
    assert_eq!(t["uses"], 2);
    let (ok, out, err) = cp(&["tokens", "list", "--json"]);
    assert!(ok, "{err}");
    assert!(!out.contains(t["token"].as_str().unwrap()));
    let listed: Vec<TokenView> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0].pool, "ci");
    let (ok, out, _) = cp(&["tokens", "list"]);
    assert!(ok && out.starts_with("ID"), "{out}");
    let (ok, _, err) = cp(&["tokens", "create", "--pool", "ci", "--uses", "0"]);
    assert!(!ok && err.contains("uses"), "{err}");
    let (ok, out, err) = cp(&["agents", "--json"]);
    assert!(ok, "{err}");
    let agents: Vec<AgentView> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        agents.iter().find(|a| a.name == "a1").unwrap().state,
        "connected"
    );

    // agents revoke NAME: the bundled agent is disconnected and refused from then on.
    let (ok, out, err) = cp(&["agents", "revoke", "a1"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("agent a1 revoked") && out.contains("was closed"),
        "{out}"
    );
    expect_unauthorized(&mut ws, "agent a1 is revoked").await;
    let mut again = connect_cert(&env, &cert, &key).await;
    expect_unauthorized(&mut again, "agent a1 is revoked").await;
    let (ok, out, _) = cp(&["agents", "--json"]);
    assert!(ok);
    let agents: Vec<AgentView> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        agents.iter().find(|a| a.name == "a1").unwrap().state,
        "revoked"
    );
    // a2 (never connected, bundled) is untouched and still gets in.
    let (c2, k2) = env.bundle("a2");
    let _ws2 = join(&env, &c2, &k2, "default").await;

    let (ok, _, err) = cp(&["agents", "revoke", "nobody"]);
    assert!(!ok && err.contains("no agent nobody"), "{err}");
    let (ok, _, err) = cp(&["tokens", "revoke", "000000000000"]);
    assert!(!ok && err.contains("no enrollment token"), "{err}");
}
