//! `cargo bench -p delegate-tests --bench figures [-- SECTION...]`
//!
//! Figures the project reports, each as a ratio against a baseline measured in the same run on the
//! same machine, never as an absolute threshold:
//! - `frames`: Log-frame encode+decode throughput vs a plain memcpy of the same bytes;
//! - `connect`: TLS 1.3 connect + Hello/Welcome against the real control plane vs a bare rustls
//!   handshake to a local rustls server;
//! - `rss`: resident memory of an idle connected agent (from /proc), next to the control plane's.
//!
//! Sections are selected by name on the command line; no name runs them all.

use delegate_protocol::{decode_binary, encode_binary, BinaryFrame, LogFrame, LogStream};
use delegate_tests::{certs, docker, ControlPlane, RunningAgent};
use futures_util::{SinkExt, StreamExt};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    if want("frames") {
        frames();
    }
    if want("connect") {
        rt.block_on(connect());
    }
    if want("rss") {
        rt.block_on(rss());
    }
}

fn frames() {
    const LINE: usize = 120;
    const BATCH: usize = 64 * 1024; // bytes of log per frame
    let payload: Vec<u8> = (0..BATCH)
        .map(|i| {
            if i % LINE == LINE - 1 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    let task = uuid::Uuid::new_v4();
    let rounds = 4000;

    let t = Instant::now();
    let mut dst = vec![0u8; BATCH];
    for _ in 0..rounds {
        // Two copies, as encode + decode each copy the payload once.
        dst.copy_from_slice(black_box(&payload));
        let again = black_box(dst.clone());
        black_box(&again);
    }
    let base = t.elapsed();

    let t = Instant::now();
    for seq in 0..rounds {
        let bytes = delegate_protocol::binary::encode_log(
            &task,
            seq as u64,
            LogStream::Stdout,
            black_box(&payload),
        );
        let frame = decode_binary(black_box(&bytes)).unwrap();
        black_box(frame);
    }
    let ours = t.elapsed();

    // The general path (frame value -> bytes -> frame value) for reference.
    let frame = BinaryFrame::Log(LogFrame {
        task_id: task,
        seq: 1,
        stream: LogStream::Stdout,
        data: payload.clone(),
    });
    let t = Instant::now();
    for _ in 0..rounds {
        black_box(decode_binary(&encode_binary(black_box(&frame))).unwrap());
    }
    let general = t.elapsed();

    let mb = (rounds * BATCH) as f64 / 1e6;
    let rate = |d: Duration| mb / d.as_secs_f64();
    println!("frames: log encode+decode {:.0} MB/s; memcpy x2 baseline {:.0} MB/s; ratio {:.2} of baseline", rate(ours), rate(base), rate(ours) / rate(base));
    println!(
        "frames: general encode_binary+decode {:.0} MB/s; ratio {:.2} of baseline",
        rate(general),
        rate(general) / rate(base)
    );
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn connect() {
    let mut cp = ControlPlane::init(&["bench"], None);
    cp.start().await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", cp.agent_port).parse().unwrap();
    let ca_pem = std::fs::read_to_string(cp.path().join("tls/ca.pem")).unwrap();
    let id = certs::Issued {
        cert_pem: std::fs::read_to_string(cp.agent_dir("bench").join("agent.pem")).unwrap(),
        key_pem: std::fs::read_to_string(cp.agent_dir("bench").join("agent.key")).unwrap(),
    };
    let client = certs::client_config(&ca_pem, Some(&id), &[&rustls::version::TLS13]);

    // Baseline: bare rustls TLS 1.3 handshake (with the same client certificate) to a local server
    // that only completes the handshake and sends one byte.
    let ca = certs::load_ca(cp.path());
    let server_id = certs::server_cert(&ca);
    let server_cfg = certs::server_config(&server_id, &[&rustls::version::TLS13]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bare_addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls.write_all(b"!").await;
                    let _ = tls.flush().await;
                }
            });
        }
    });
    let n = 200;
    let mut bare = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let tcp = tokio::net::TcpStream::connect(bare_addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.unwrap();
        bare.push(t.elapsed());
    }
    server.abort();

    let hello =
        serde_json::json!({"type":"hello","versions":[1],"agent_version":"bench","name":"bench",
        "pool":"default","labels":{},"slots":1,"tasks":[]})
        .to_string();
    let mut ours = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut ws = certs::try_connect(addr, client.clone()).await.unwrap();
        ws.send(WsMessage::text(hello.clone())).await.unwrap();
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) if t.as_str().contains("\"welcome\"") => break,
                Some(Ok(_)) => continue,
                other => panic!("no welcome: {other:?}"),
            }
        }
        ours.push(t.elapsed());
        let _ = ws.close(None).await;
    }
    let (b50, b99) = (percentile(&mut bare, 0.5), percentile(&mut bare, 0.99));
    let (o50, o99) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.99));
    println!("connect: bare rustls TLS 1.3 handshake p50 {b50:?} p99 {b99:?} (n={n})");
    println!("connect: TLS 1.3 + WebSocket + Hello/Welcome p50 {o50:?} p99 {o99:?}; p50 ratio {:.2}x of baseline", o50.as_secs_f64() / b50.as_secs_f64());
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn rss() {
    let mut cp = ControlPlane::init(&["idle"], None);
    cp.start().await;
    let image = docker::sandbox_image();
    let agent = RunningAgent::start(
        &cp.agent_dir("idle").join("agent.toml"),
        "idle",
        &[("DELEGATE_SANDBOX__IMAGE", image)],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while cp.agent_state("idle").as_deref() != Some("connected") {
        assert!(
            Instant::now() < deadline,
            "agent did not connect:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let it settle through a few heartbeats.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let pid = agent.pid().unwrap();
    let agent_rss = rss_kib(pid).unwrap();
    println!(
        "rss: idle connected agent {} KiB ({:.1} MiB)",
        agent_rss,
        agent_rss as f64 / 1024.0
    );
}
