//! The egress proxy end to end on loopback: a real proxy, a plain HTTP upstream and a rustls TLS
//! upstream started here, names resolved by a resolver the test owns.
//!
//! Every upstream listens on 127.0.0.1, which the proxy refuses (loopback) unless an allow rule
//! explicitly covers it. So the task that must reach them carries the network rule `127.0.0.1/32`:
//! that is exactly the "unless explicitly listed" path. The task without it shows the refusal.
//! The SNI check normally applies to port 443; the TLS upstream has an ephemeral port, which the
//! test adds to `sni_ports`.

use base64::Engine;
use delegate_agent::egress::proxy::{
    EgressProxy, EgressRecord, ProxyConfig, StaticResolver, TaskCredentials,
};
use delegate_agent::egress::rules::{Cidr, Policy};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Guards against a hung test only; never an assertion about speed.
const HANG: Duration = Duration::from_secs(30);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A plain HTTP server: answers every request with its request line and Host header in the body,
/// and reports each request head it saw.
async fn http_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let request_line = head.lines().next().unwrap_or("").to_string();
                let host = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Host: "))
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(head);
                let body = format!("upstream saw {request_line} host={host}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = reader.get_mut().write_all(response.as_bytes()).await;
                let _ = reader.get_mut().shutdown().await;
            });
        }
    });
    (addr, rx)
}

/// A TLS server for `tls.test` (rcgen certificate) that answers a line with "pong".
async fn tls_upstream() -> (SocketAddr, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["tls.test".to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut reader = BufReader::new(tls);
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let _ = reader.get_mut().write_all(b"pong\n").await;
                    let _ = reader.get_mut().shutdown().await;
                }
            });
        }
    });
    (addr, cert)
}

struct Fixture {
    proxy: EgressProxy,
    records: mpsc::Receiver<EgressRecord>,
    http: SocketAddr,
    http_heads: mpsc::UnboundedReceiver<String>,
    tls: SocketAddr,
    tls_cert: CertificateDer<'static>,
    /// Reaches the upstreams: name rules plus the explicit `127.0.0.1/32` network rule.
    task_a: TaskCredentials,
    /// Same names, no network rule: loopback stays refused.
    task_b: TaskCredentials,
}

fn loopback() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn policy(allow: &[String]) -> Policy {
    Policy::parse(allow, &[]).unwrap()
}

async fn fixture() -> Fixture {
    let (http, http_heads) = http_upstream().await;
    let (tls, tls_cert) = tls_upstream().await;
    let resolver = StaticResolver::new()
        .insert("web.test", &[loopback()])
        .insert("tls.test", &[loopback()])
        .insert("other.test", &[loopback()])
        .insert("loop.test", &[loopback()])
        .insert("meta.test", &["169.254.169.254".parse().unwrap()]);
    // A stand-in for the Docker bridge subnets and the host's own address.
    let protected: Vec<Cidr> = vec![
        "10.99.0.0/16".parse().unwrap(),
        "192.0.2.2/32".parse().unwrap(),
    ];
    let mut config = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), protected);
    config.sni_ports = vec![443, tls.port()];
    let (tx, records) = mpsc::channel(64);
    let proxy = EgressProxy::start(config, Arc::new(resolver), tx)
        .await
        .unwrap();
    let a = policy(&[
        format!("web.test:{}", http.port()),
        format!("tls.test:{}", tls.port()),
        format!("meta.test:{}", http.port()),
        // Everything by address: still not the metadata address, loopback or protected networks.
        "0.0.0.0/0".to_string(),
        // Explicitly listed loopback address: the only way to reach a loopback upstream.
        "127.0.0.1/32".to_string(),
    ]);
    let b = policy(&[format!("loop.test:{}", http.port())]);
    let task_a = proxy.register("task-a", a, None).unwrap();
    let task_b = proxy.register("task-b", b, None).unwrap();
    Fixture {
        proxy,
        records,
        http,
        http_heads,
        tls,
        tls_cert,
        task_a,
        task_b,
    }
}

fn auth(c: &TaskCredentials) -> String {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
    format!("Proxy-Authorization: Basic {token}\r\n")
}

/// Send a request head; return the status and the whole answer (read to EOF, as the proxy closes
/// after an error).
async fn ask(proxy: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(HANG, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// CONNECT and read the proxy's answer head only; the stream is then the tunnel.
async fn connect(proxy: SocketAddr, target: &str, creds: &TaskCredentials) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\n",
        auth(creds)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(HANG, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "proxy closed during the answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&got[9..12]).parse().unwrap();
    (status, s)
}

async fn tls_over(
    stream: TcpStream,
    cert: &CertificateDer<'static>,
    name: &str,
    sni: bool,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_sni = sni;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let mut tls = tokio::time::timeout(HANG, connector.connect(server_name, stream))
        .await
        .unwrap()?;
    tls.write_all(b"ping\n").await?;
    let mut out = String::new();
    tokio::time::timeout(HANG, tls.read_to_string(&mut out))
        .await
        .unwrap()?;
    Ok(out)
}

async fn next_record(f: &mut Fixture) -> EgressRecord {
    tokio::time::timeout(HANG, f.records.recv())
        .await
        .unwrap()
        .unwrap()
}

fn assert_denied(rec: &EgressRecord, task: Option<&str>, destination: &str, reason: &str) {
    assert_eq!(rec.task_id.as_deref(), task, "{rec:?}");
    assert_eq!(rec.destination, destination, "{rec:?}");
    assert!(!rec.allowed, "{rec:?}");
    assert!(
        rec.reason.as_deref().unwrap_or("").contains(reason),
        "{rec:?} lacks {reason:?}"
    );
    assert_eq!((rec.bytes_up, rec.bytes_down), (0, 0), "{rec:?}");
}

#[tokio::test]
async fn allowed_host_is_reached_through_connect_with_tls() {
    let mut f = fixture().await;
    let target = format!("tls.test:{}", f.tls.port());
    let (status, stream) = connect(f.proxy.local_addr(), &target, &f.task_a).await;
    assert_eq!(status, 200);
    let answer = tls_over(stream, &f.tls_cert, "tls.test", true)
        .await
        .unwrap();
    assert_eq!(answer, "pong\n");
    let rec = next_record(&mut f).await;
    assert_eq!(rec.task_id.as_deref(), Some("task-a"));
    assert_eq!(rec.destination, target);
    assert!(rec.allowed, "{rec:?}");
    assert_eq!(rec.rule, Some(target.clone()));
    assert_eq!(rec.resolved, Some(f.tls));
    assert_eq!(rec.reason, None);
    assert!(rec.bytes_up > 0 && rec.bytes_down > 0, "{rec:?}");
}

#[tokio::test]
async fn allowed_host_is_reached_through_absolute_form_http() {
    let mut f = fixture().await;
    let port = f.http.port();
    let head = format!(
        "GET http://WEB.test.:{port}/hello?x=1 HTTP/1.1\r\nHost: evil.test\r\n{}Proxy-Connection: keep-alive\r\n\r\n",
        auth(&f.task_a)
    );
    let (status, text) = ask(f.proxy.local_addr(), &head).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with(&format!(
            "upstream saw GET /hello?x=1 HTTP/1.1 host=web.test:{port}"
        )),
        "{text}"
    );
    let seen = f.http_heads.recv().await.unwrap();
    assert!(
        !seen.to_ascii_lowercase().contains("proxy-"),
        "proxy headers reached the upstream: {seen}"
    );
    assert!(seen.contains("Connection: close"), "{seen}");
    let rec = next_record(&mut f).await;
    assert!(rec.allowed, "{rec:?}");
    assert_eq!(rec.destination, format!("WEB.test.:{port}"));
    assert_eq!(rec.rule, Some(format!("web.test:{port}")));
    assert_eq!(rec.resolved, Some(f.http));
    assert!(
        rec.bytes_up > 0 && rec.bytes_down as usize == text.len(),
        "{rec:?}"
    );
}

#[tokio::test]
async fn plain_http_to_an_allowed_ip_through_a_network_rule() {
    let mut f = fixture().await;
    let target = format!("127.0.0.1:{}", f.http.port());
    let head = format!("GET http://{target}/ HTTP/1.1\r\n{}\r\n", auth(&f.task_a));
    let (status, text) = ask(f.proxy.local_addr(), &head).await;
    assert_eq!(status, 200, "{text}");
    let rec = next_record(&mut f).await;
    assert!(
        rec.allowed && rec.rule.as_deref() == Some("127.0.0.1"),
        "{rec:?}"
    );
}

#[tokio::test]
async fn denials_answer_403_and_are_recorded() {
    let mut f = fixture().await;
    let proxy = f.proxy.local_addr();
    let (hp, tp) = (f.http.port(), f.tls.port());
    let (a, b) = (f.task_a.clone(), f.task_b.clone());
    let cases: Vec<(String, &TaskCredentials, &str, &str)> = vec![
        // (target, credentials, task id, reason fragment)
        (
            format!("nope.test:{hp}"),
            &a,
            "task-a",
            "not in the egress allowlist",
        ),
        (
            format!("web.test:{tp}"),
            &a,
            "task-a",
            "not in the egress allowlist",
        ),
        (
            format!("127.0.0.1:{hp}"),
            &b,
            "task-b",
            "only by a network rule",
        ),
        (
            "169.254.169.254:80".to_string(),
            &a,
            "task-a",
            "cloud metadata address",
        ),
        (
            format!("meta.test:{hp}"),
            &a,
            "task-a",
            "cloud metadata address",
        ),
        (format!("loop.test:{hp}"), &b, "task-b", "loopback"),
        (
            "10.99.0.5:80".to_string(),
            &a,
            "task-a",
            "protected network",
        ),
        (
            "[::ffff:169.254.169.254]:80".to_string(),
            &a,
            "task-a",
            "cloud metadata address",
        ),
        // Another task's grant: task-b's credentials do not reach what task-a may.
        (
            format!("tls.test:{tp}"),
            &b,
            "task-b",
            "not in the egress allowlist",
        ),
    ];
    for (target, creds, task, reason) in &cases {
        let head = format!("CONNECT {target} HTTP/1.1\r\n{}\r\n", auth(creds));
        let (status, text) = ask(proxy, &head).await;
        assert_eq!(status, 403, "{target}: {text}");
        assert!(text.contains(reason), "{target}: {text}");
        let rec = next_record(&mut f).await;
        assert_denied(&rec, Some(task), target, reason);
    }
    // The same through absolute-form HTTP.
    let head = format!(
        "GET http://nope.test:{hp}/ HTTP/1.1\r\n{}\r\n",
        auth(&f.task_a)
    );
    assert_eq!(ask(proxy, &head).await.0, 403);
    assert_denied(
        &next_record(&mut f).await,
        Some("task-a"),
        &format!("nope.test:{hp}"),
        "not in the egress allowlist",
    );
    // A refused address is named in the record.
    let head = format!("CONNECT loop.test:{hp} HTTP/1.1\r\n{}\r\n", auth(&f.task_b));
    ask(proxy, &head).await;
    assert_eq!(
        next_record(&mut f).await.resolved,
        Some(SocketAddr::new(loopback(), hp))
    );
    assert!(
        f.http_heads.try_recv().is_err(),
        "no denied request reached the upstream"
    );
}

#[tokio::test]
async fn credentials_are_required_and_checked() {
    let mut f = fixture().await;
    let proxy = f.proxy.local_addr();
    let target = format!("web.test:{}", f.http.port());
    let (status, text) = ask(proxy, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
    assert_eq!(status, 407, "{text}");
    assert!(text.contains("Proxy-Authenticate: Basic"), "{text}");
    assert_denied(
        &next_record(&mut f).await,
        None,
        &target,
        "missing proxy credentials",
    );

    let forged = TaskCredentials {
        user: f.task_a.user.clone(),
        password: f.task_b.password.clone(),
    };
    let (status, _) = ask(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\n{}\r\n", auth(&forged)),
    )
    .await;
    assert_eq!(status, 407);
    assert_denied(
        &next_record(&mut f).await,
        None,
        &target,
        "invalid proxy credentials",
    );

    // Credentials bound to another task network do not work from here.
    let fenced = f
        .proxy
        .register(
            "task-c",
            policy(&[target.clone(), "127.0.0.1/32".into()]),
            Some("10.99.0.0/16".parse().unwrap()),
        )
        .unwrap();
    let (status, _) = ask(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\n{}\r\n", auth(&fenced)),
    )
    .await;
    assert_eq!(status, 407);
    assert_denied(
        &next_record(&mut f).await,
        None,
        &target,
        "not valid from this address",
    );

    // Revoked credentials stop working.
    assert!(f.proxy.unregister("task-b"));
    let (status, _) = ask(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\n{}\r\n", auth(&f.task_b)),
    )
    .await;
    assert_eq!(status, 407);
    assert_denied(
        &next_record(&mut f).await,
        None,
        &target,
        "invalid proxy credentials",
    );
    assert!(
        f.proxy.register("task-a", Policy::default(), None).is_err(),
        "a task registers once"
    );
}

#[tokio::test]
async fn server_name_must_match_the_connect_host() {
    let mut f = fixture().await;
    let target = format!("tls.test:{}", f.tls.port());
    for (name, sni, reason) in [
        ("other.test", true, "differs from the CONNECT host"),
        ("tls.test", false, "SNI missing"),
    ] {
        let (status, stream) = connect(f.proxy.local_addr(), &target, &f.task_a).await;
        assert_eq!(
            status, 200,
            "the tunnel opens before the ClientHello is read"
        );
        let err = tls_over(stream, &f.tls_cert, name, sni).await.unwrap_err();
        assert!(
            err.to_string().to_lowercase().contains("access"),
            "{name}: {err}"
        );
        let rec = next_record(&mut f).await;
        assert_denied(&rec, Some("task-a"), &target, reason);
    }
    // Plain text where a ClientHello belongs.
    let (_, mut stream) = connect(f.proxy.local_addr(), &target, &f.task_a).await;
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(HANG, stream.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_denied(
        &next_record(&mut f).await,
        Some("task-a"),
        &target,
        "did not start with a TLS handshake",
    );
}

#[tokio::test]
async fn bad_requests_get_400() {
    let mut f = fixture().await;
    let (status, _) = ask(f.proxy.local_addr(), "NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(status, 400);
    let rec = next_record(&mut f).await;
    assert!(
        !rec.allowed && rec.reason.as_deref().unwrap_or("").contains("malformed"),
        "{rec:?}"
    );
    let head = format!("CONNECT bad..host:443 HTTP/1.1\r\n{}\r\n", auth(&f.task_a));
    let (status, _) = ask(f.proxy.local_addr(), &head).await;
    assert_eq!(status, 400);
    assert_denied(
        &next_record(&mut f).await,
        Some("task-a"),
        "bad..host:443",
        "bad host",
    );
}

#[tokio::test]
async fn unregistering_a_task_closes_its_open_tunnels() {
    let mut f = fixture().await;
    let target = format!("web.test:{}", f.http.port());
    let (status, mut tunnel) = connect(f.proxy.local_addr(), &target, &f.task_a).await;
    assert_eq!(status, 200);
    assert!(f.proxy.unregister("task-a"));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(HANG, tunnel.read_to_end(&mut rest))
        .await
        .unwrap();
    let rec = next_record(&mut f).await;
    assert!(rec.allowed, "{rec:?}");
    assert!(
        rec.reason.as_deref().unwrap_or("").contains("revoked"),
        "{rec:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let (tx, mut records) = mpsc::channel(8);
    let mut config = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), vec![]);
    config.max_connections = 1;
    let proxy = EgressProxy::start(config, Arc::new(StaticResolver::new()), tx)
        .await
        .unwrap();
    // The first connection holds the only slot while it has not finished its head.
    let mut first = TcpStream::connect(proxy.local_addr()).await.unwrap();
    first
        .write_all(b"CONNECT a.test:443 HTTP/1.1\r\n")
        .await
        .unwrap();
    let (status, _) = ask(proxy.local_addr(), "CONNECT a.test:443 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 503);
    let rec = tokio::time::timeout(HANG, records.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        rec.reason
            .as_deref()
            .unwrap_or("")
            .contains("connection limit"),
        "{rec:?}"
    );
    // Shutdown closes the waiting connection too.
    proxy.shutdown().await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(HANG, first.read_to_end(&mut rest))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Host firewall rules, for real: a network namespace on a test bridge stands in for a sandbox on a
// task network. Needs root (CAP_NET_ADMIN) and `ip`, `nft`, `iptables`; skipped, saying so,
// without them.

mod firewall_lab {
    use delegate_agent::egress::firewall::{self, Backend, Isolation};
    use delegate_agent::egress::local;
    use std::net::{IpAddr, Ipv4Addr};
    use std::process::Command;
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// A bridge with a host address and a namespace attached to it; removed on drop.
    struct Lab {
        bridge: String,
        ns: String,
        veth: String,
        gateway: Ipv4Addr,
    }

    impl Lab {
        fn create() -> Option<Lab> {
            let tag = format!("{:06x}", (std::process::id() ^ rand_u32()) & 0xff_ffff);
            let octet = (rand_u32() % 250) as u8 + 2;
            let lab = Lab {
                bridge: format!("dlgb{tag}"),
                ns: format!("dlgns{tag}"),
                veth: format!("dlgv{tag}"),
                gateway: Ipv4Addr::new(10, 237, octet, 1),
            };
            let peer = format!("dlgp{tag}");
            let gw = format!("{}/24", lab.gateway);
            let inner = format!("10.237.{octet}.2/24");
            if !ip(&["netns", "add", &lab.ns]) {
                return None;
            }
            let ok = ip(&["link", "add", &lab.bridge, "type", "bridge"])
                && ip(&["addr", "add", &gw, "dev", &lab.bridge])
                && ip(&["link", "set", &lab.bridge, "up"])
                && ip(&[
                    "link", "add", &lab.veth, "type", "veth", "peer", "name", &peer,
                ])
                && ip(&["link", "set", &lab.veth, "master", &lab.bridge, "up"])
                && ip(&["link", "set", &peer, "netns", &lab.ns])
                && ip(&["-n", &lab.ns, "addr", "add", &inner, "dev", &peer])
                && ip(&["-n", &lab.ns, "link", "set", &peer, "up"])
                && ip(&["-n", &lab.ns, "link", "set", "lo", "up"])
                && ip(&[
                    "-n",
                    &lab.ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &lab.gateway.to_string(),
                ]);
            if !ok {
                drop(lab);
                return None;
            }
            Some(lab)
        }

        fn isolation(&self, proxy_port: u16) -> Isolation {
            Isolation {
                bridge: self.bridge.clone(),
                gateway: IpAddr::V4(self.gateway),
                proxy_port,
                backend_port: None,
            }
        }

        /// Whether a TCP connection from inside the namespace to `addr:port` is accepted.
        async fn reaches(&self, addr: IpAddr, port: u16) -> bool {
            let script = format!("exec 3<>/dev/tcp/{addr}/{port}");
            let out = tokio::process::Command::new("timeout")
                .args(["20", "ip", "netns", "exec", &self.ns, "bash", "-c", &script])
                .output()
                .await
                .unwrap();
            assert_ne!(
                out.status.code(),
                Some(124),
                "the probe hung: a rule drops instead of rejecting"
            );
            out.status.success()
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let _ = Command::new("nft")
                .args([
                    "delete",
                    "table",
                    "inet",
                    &format!("delegate_{}", self.bridge),
                ])
                .output();
            ip(&["netns", "del", &self.ns]);
            ip(&["link", "del", &self.veth]);
            ip(&["link", "del", &self.bridge]);
        }
    }

    fn rand_u32() -> u32 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.finish() as u32
    }

    async fn listen_anywhere() -> u16 {
        let l = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drop(s);
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_sandbox_reaches_only_the_proxy_port_on_the_host() {
        let Some(lab) = Lab::create() else {
            eprintln!(
                "SKIPPED: cannot create a network namespace and bridge here (needs root and `ip`)"
            );
            return;
        };
        // A host service on 0.0.0.0, and the proxy's port (also on 0.0.0.0, the worst case).
        let service = listen_anywhere().await;
        let proxy = listen_anywhere().await;
        let gw = IpAddr::V4(lab.gateway);
        // Another address of this host, reachable through the gateway by routing.
        let other = local::host_addresses()
            .unwrap()
            .into_iter()
            .map(|c| c.addr())
            .find(|a| matches!(a, IpAddr::V4(v4) if !v4.is_loopback() && *v4 != lab.gateway));

        assert!(
            lab.reaches(gw, service).await,
            "control: without rules the host service is reachable"
        );
        if let Some(o) = other {
            assert!(
                lab.reaches(o, service).await,
                "control: {o} reachable without rules"
            );
        }
        let mut backends = Vec::new();
        if firewall::detect().await == Some(Backend::Nft) {
            backends.push(Backend::Nft);
        }
        if Command::new("iptables")
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            backends.push(Backend::Iptables);
        }
        assert!(!backends.is_empty(), "neither nft nor iptables here");
        for backend in backends {
            let iso = lab.isolation(proxy);
            firewall::apply(backend, &iso).await.unwrap();
            firewall::apply(backend, &iso).await.unwrap(); // re-applying replaces, never stacks
            assert!(
                lab.reaches(gw, proxy).await,
                "{backend:?}: the proxy port stays reachable"
            );
            assert!(
                !lab.reaches(gw, service).await,
                "{backend:?}: a host service on 0.0.0.0 is refused"
            );
            if let Some(o) = other {
                assert!(!lab.reaches(o, service).await, "{backend:?}: {o} refused");
                assert!(
                    !lab.reaches(o, proxy).await,
                    "{backend:?}: the proxy port only on the gateway IP"
                );
            }
            // Beyond the host (routed by the lab's default route): rejected on the forward path,
            // so nothing leaves. Only ever tried with the rules in place.
            let beyond = IpAddr::V4(Ipv4Addr::new(198, 18, 255, 254));
            assert!(
                !lab.reaches(beyond, 9).await,
                "{backend:?}: forwarding out of the bridge is refused"
            );
            // nft remembers what was refused, for the audit trail; iptables does not.
            let rejected = firewall::rejected(backend, &iso).await.unwrap();
            if backend == Backend::Nft {
                let want = firewall::Rejected {
                    addr: gw,
                    protocol: "tcp".into(),
                    port: service,
                };
                assert!(rejected.contains(&want), "{rejected:?}");
                let forwarded = firewall::Rejected {
                    addr: beyond,
                    protocol: "tcp".into(),
                    port: 9,
                };
                assert!(rejected.contains(&forwarded), "{rejected:?}");
                assert!(
                    !rejected.iter().any(|r| r.addr == gw && r.port == proxy),
                    "the allowed port is not a rejection: {rejected:?}"
                );
                if let Some(o) = other {
                    assert!(
                        rejected.iter().any(|r| r.addr == o && r.port == proxy),
                        "{rejected:?}"
                    );
                }
            } else {
                assert!(rejected.is_empty());
            }
            firewall::remove(backend, &iso).await.unwrap();
            firewall::remove(backend, &iso).await.unwrap(); // idempotent
            assert!(
                lab.reaches(gw, service).await,
                "{backend:?}: removed rules leave nothing behind"
            );
        }
    }
}
