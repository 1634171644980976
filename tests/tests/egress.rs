//! End to end: the egress allowlist, from inside a sandbox run by the real agent (control plane +
//! `delegate` binary + Docker), down to the egress events the control plane stores.
//!
//! The workload. The agent runs whatever binary its sandbox image names (`io.delegate.binary`);
//! these tests build a small local image `FROM scratch` holding Debian's static busybox and a
//! `/probe` entry point, which runs the workspace's `probe.sh` when the agent calls `init` and
//! succeeds at every other step. So a `validate` task runs our probes with exactly the network,
//! proxy environment, credentials, firewall rules and hardening a tofu step gets. It is not a fake
//! tofu: no tofu behaviour is claimed from it (the tofu test below uses the real binary).
//!
//! The upstreams are the project's own: a Docker container with no Docker network (so its address
//! is neither a host address nor a Docker subnet, like a mirror elsewhere in a private network),
//! given an address in 198.18.0.0/15 (the benchmarking range, never routed) through a veth pair the
//! test creates (`delegate_tests::upstream`). Inside that container's network namespace the test
//! binds its HTTP server (port 80) and runs `openssl s_server` for TLS (port 443): busybox's TLS
//! client sends no signature_algorithms extension, so the server must accept SHA-1 handshake
//! signatures, which rustls rightly never does — hence openssl at `SECLEVEL=0`, for this test
//! server only. Names reach the upstream only through the agent's `egress.hosts`, so nothing is
//! ever asked of DNS, and nothing leaves this host: the other addresses the probes try are refused
//! by the proxy before any connection, or rejected by the host firewall on their way out.
//!
//! Needs root (veth, namespaces, nftables), Docker, `openssl` and `/bin/busybox` (Debian
//! `busybox-static`; both installed by `.ci/install-deps`).

use delegate_tests::docker::{BuildContext, Image};
use delegate_tests::fleet::{egress_events, Fleet};
use delegate_tests::process::table;
use delegate_tests::upstream::{busybox, Upstream, BUSYBOX};
use delegate_tests::RUN_LABEL;
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The probe image's entry point: the agent calls it as it would call tofu.
const ENTRY: &str = r#"#!/bin/sh
# Delegate egress tests: run the workspace's probes at `init`, succeed at every other step.
case "$1" in
  init) exec /bin/sh /workspace/probe.sh ;;
  *) exit 0 ;;
esac
"#;

/// The probes. Each prints one `PROBE <name>: <what happened>` line; every network call is bounded
/// by `timeout`. MODE picks the set: `all`, `leak` (print this task's proxy credentials reversed,
/// so the redactor does not hide them, then wait to be cancelled) or `steal` (use another task's).
const PROBES: &str = r#"
P=${HTTP_PROXY#http://}
CREDS=${P%@*}
PROXY=${P##*@}
PHOST=${PROXY%:*}
PPORT=${PROXY##*:}
AUTH=$(printf %s "$CREDS" | base64 -w 0)
export AUTH
CRLF=$(printf '\r\n')

# A raw request to the proxy on stdin; prints the first line of the answer.
raw() { timeout 20 nc "$PHOST" "$PPORT" 2>&1 | head -n 1 | tr -d '\r'; }
# CONNECT $1 through the proxy, then TLS with server name $2; prints what came back.
tls() { timeout 20 nc "$PHOST" "$PPORT" -e /bin/sh /workspace/tls.sh "$1" "$2" 2>&1 | tr '\n' ' '; }
get() { timeout 20 wget -q -O - "$1" 2>&1 | tr '\n' ' '; }

case "${MODE:-all}" in
all)
  echo "PROBE http_allowed: $(get http://http.test/hello)"
  echo "PROBE tls_allowed: $(tls tls.test:443 tls.test)"
  echo "PROBE not_listed: $(get http://other.test/)"
  echo "PROBE wrong_port: $(get http://http.test:8080/)"
  echo "PROBE ip_literal: $(get http://$UPSTREAM_IP/)"
  echo "PROBE metadata_ip: $(get http://169.254.169.254/latest/meta-data/)"
  echo "PROBE metadata_name: $(get http://metadata.test/latest/meta-data/)"
  echo "PROBE loopback_name: $(get http://loop.test/)"
  echo "PROBE sni_mismatch: $(tls tls.test:443 other.test)"
  echo "PROBE no_credentials: $(printf 'GET http://http.test/nocreds HTTP/1.1\r\nHost: http.test\r\n\r\n' | raw)"
  echo "PROBE direct: $(timeout 20 nc -w 5 "$UPSTREAM_IP" 80 </dev/null 2>&1)"
  echo "PROBE host_service_direct: $(timeout 20 nc -w 5 "$PHOST" "$HOST_PORT" </dev/null 2>&1)"
  echo "PROBE host_service_proxy: $(printf 'CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\nProxy-Authorization: Basic %s\r\n\r\n' "$PHOST" "$HOST_PORT" "$PHOST" "$HOST_PORT" "$AUTH" | raw)"
  ;;
leak)
  echo "PROXY_ENV $HTTP_PROXY"
  echo "LEAK $(printf %s "$CREDS" | rev) $PROXY"
  sleep 600
  ;;
steal)
  STOLEN_AUTH=$(printf %s "$STOLEN" | base64 -w 0)
  echo "PROBE stolen_credentials: $(printf 'GET http://http.test/stolen HTTP/1.1\r\nHost: http.test\r\nProxy-Authorization: Basic %s\r\n\r\n' "$STOLEN_AUTH" | raw)"
  echo "PROBE other_proxy: $(timeout 20 nc -w 5 "${STOLEN_PROXY%:*}" "${STOLEN_PROXY##*:}" </dev/null 2>&1)"
  ;;
esac
"#;

/// Run by `nc -e` with the proxy connection on stdin/stdout: CONNECT, then a TLS request.
const TLS_SCRIPT: &str = r#"
printf 'CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n' "$1" "$1" "$AUTH"
read -r status
while read -r line; do [ "${#line}" -le 1 ] && break; done
echo "connect: $status" | tr -d '\r' >&2
case "$status" in *" 200 "*) ;; *) exit 0 ;; esac
exec 3<&0 4>&1
printf 'GET /tls-ok.txt HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" | ssl_client -s 4 -r 3 -n "$2" >&2
echo "ssl_client exit $?" >&2
"#;

/// The probe image, removed on drop.
fn probe_image(run: &str) -> Image {
    let busybox = busybox();
    let applets = Command::new(BUSYBOX).arg("--list").output().unwrap();
    let applets = String::from_utf8_lossy(&applets.stdout).into_owned();
    let tag = format!("delegate-egress-probe:{run}");
    let dockerfile =
        format!("FROM scratch\nCOPY . /\nLABEL io.delegate.binary=/probe {RUN_LABEL}={run}\n");
    let mut context = BuildContext::new();
    context
        .file("Dockerfile", dockerfile.as_bytes(), 0o644)
        .file("bin/busybox", &busybox, 0o755)
        .file("probe", ENTRY.as_bytes(), 0o755);
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        context.symlink(&format!("bin/{applet}"), "busybox");
    }
    context.build(&tag, false, "the probe image")
}

/// The request lines the upstream HTTP server saw.
#[derive(Debug, Default)]
struct Seen {
    http: Vec<String>,
}

/// The upstream container (see `delegate_tests::upstream`) with the test's HTTP server (80) bound
/// inside its network namespace and `openssl s_server` (443, a certificate for `tls.test`) running
/// there. The TLS server is killed, and the container removed, on drop.
struct ProbeUpstream {
    ns: Upstream,
    ip: Ipv4Addr,
    seen: Arc<Mutex<Seen>>,
    tls: Option<std::process::Child>,
    _files: tempfile::TempDir,
}

impl ProbeUpstream {
    async fn start(run: &str, image: &str, host_ip: Ipv4Addr, ip: Ipv4Addr) -> ProbeUpstream {
        let ns = Upstream::start(run, "egress-upstream", image, host_ip, ip);
        let files = tempfile::tempdir().unwrap();
        let mut up = ProbeUpstream {
            ns,
            ip,
            seen: Arc::new(Mutex::new(Seen::default())),
            tls: None,
            _files: files,
        };
        tokio::spawn(serve_http(up.ns.listen(80), up.seen.clone()));

        // The TLS server, in the same namespace.
        let dir = up._files.path();
        let certified = rcgen::generate_simple_self_signed(vec!["tls.test".to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
        std::fs::write(dir.join("tls-ok.txt"), "tls-upstream-ok\n").unwrap();
        let child = up
            .ns
            .nsenter()
            .args([
                "openssl",
                "s_server",
                "-quiet",
                "-accept",
                "443",
                "-cert",
                "cert.pem",
                "-key",
                "key.pem",
                "-WWW",
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
            ])
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server (install openssl)");
        up.tls = Some(child);
        let target = std::net::SocketAddr::from((ip, 443));
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(target).await.is_ok() {
                return up;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the TLS upstream did not start listening on {target}");
    }

    /// Stop the TLS server, remove the container (and with its namespace, the veth).
    fn stop(&mut self) {
        if let Some(mut c) = self.tls.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.ns.stop();
    }
}

impl Drop for ProbeUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match s.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

async fn serve_http(listener: TcpListener, seen: Arc<Mutex<Seen>>) {
    while let Ok((mut s, _)) = listener.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let head = read_head(&mut s).await;
            let first = head.lines().next().unwrap_or("").to_string();
            seen.lock().unwrap().http.push(first.clone());
            let body = format!("http-upstream-ok {first}\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// A host service on 0.0.0.0 that counts connections (none may come from a sandbox).
async fn host_service() -> (u16, Arc<Mutex<usize>>) {
    let l = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            *c.lock().unwrap() += 1;
            drop(s);
        }
    });
    (port, count)
}

/// The agent's egress configuration for these tests.
fn egress_config(doc: &mut toml::Table, upstream: Ipv4Addr) {
    let egress = table(doc, "egress");
    let list = |v: &[&str]| {
        toml::Value::Array(
            v.iter()
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        )
    };
    egress.insert(
        "allow".into(),
        list(&[
            "http.test:80",
            "tls.test:443",
            "loop.test:80",
            "metadata.test:80",
        ]),
    );
    egress.insert("deny".into(), list(&["*.blocked.test:*"]));
    let mut hosts = toml::Table::new();
    for (name, ip) in [
        ("http.test", upstream.to_string()),
        ("tls.test", upstream.to_string()),
        ("other.test", upstream.to_string()),
        ("loop.test", "127.0.0.1".to_string()),
        ("metadata.test", "169.254.169.254".to_string()),
    ] {
        hosts.insert(name.into(), toml::Value::String(ip));
    }
    egress.insert("hosts".into(), toml::Value::Table(hosts));
}

/// The `PROBE name: ...` line of a log.
fn probe<'a>(logs: &'a str, name: &str) -> &'a str {
    let prefix = format!("PROBE {name}:");
    logs.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in the logs:\n{logs}"))
}

/// Every egress event of a task is one audit record naming its destination and outcome.
fn audited_like_events(f: &Fleet, task: &str, events: &[Value]) {
    let audit = f.egress_audit(task);
    assert_eq!(audit.len(), events.len(), "{audit:#?}\n{events:#?}");
    for e in events {
        let action = if e["allowed"] == true {
            "egress.allowed"
        } else {
            "egress.denied"
        };
        let dest = format!("destination {} ", e["destination"].as_str().unwrap());
        assert!(
            audit.iter().any(|r| r["action"] == action
                && r["target"] == task
                && r["detail"].as_str().is_some_and(|d| d.contains(&dest))),
            "no {action} audit record for {dest}: {audit:#?}"
        );
    }
}

/// The one event for `destination` whose detail contains `needle`.
fn event<'a>(events: &'a [Value], destination: &str, needle: &str) -> &'a Value {
    events
        .iter()
        .find(|e| {
            e["destination"] == destination
                && e["detail"].as_str().is_some_and(|d| d.contains(needle))
        })
        .unwrap_or_else(|| {
            panic!("no egress event for {destination} with {needle:?}; events: {events:#?}")
        })
}

fn denied<'a>(events: &'a [Value], destination: &str, needle: &str, logs: &str) -> &'a Value {
    let e = event(events, destination, needle);
    assert_eq!(e["allowed"], false, "{e}");
    assert!(
        logs.contains(&format!("delegate: egress denied: {destination}")),
        "the denial of {destination} is not in the task log:\n{logs}"
    );
    e
}

/// The host firewall tables of these tasks' bridges still present (none may be).
fn firewall_tables_of(tasks: &[&str]) -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let names: Vec<String> = tasks
        .iter()
        .map(|t| format!("delegate_dlg{}", &t.replace('-', "")[..12]))
        .collect();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .map(str::to_string)
        .collect()
}

struct Setup {
    f: Fleet,
    upstream: ProbeUpstream,
    ws: PathBuf,
    // Dropped last: the agent must be gone before its image.
    _image: Image,
}

/// `agent` must be unique among the tests of this file: they run at once on one Docker engine,
/// and an agent starting up removes every object carrying its name that it does not know.
async fn setup(agent: &str, slots: u32) -> Setup {
    let image_run = delegate_tests::run_id();
    let image = probe_image(&image_run);
    let (host_side, upstream_ip) = Upstream::address();
    let tag = image.tag.clone();
    let f = Fleet::start_with(&[agent], slots, |doc| {
        table(doc, "sandbox").insert("image".into(), toml::Value::String(tag.clone()));
        egress_config(doc, upstream_ip);
    })
    .await;
    let upstream = ProbeUpstream::start(&f.run, &image.tag, host_side, upstream_ip).await;
    let ws = f.write_workspace("probe", &[("probe.sh", PROBES), ("tls.sh", TLS_SCRIPT)]);
    Setup {
        f,
        upstream,
        ws,
        _image: image,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_reaches_only_what_is_allowed_and_every_decision_is_audited() {
    let mut s = setup("prober", 1).await;
    let f = &s.f;
    let (host_port, host_hits) = host_service().await;
    let up = s.upstream.ip.to_string();
    let id = f.submit(
        &s.ws,
        &[
            "--op",
            "validate",
            "--env",
            &format!("UPSTREAM_IP={up}"),
            "--env",
            &format!("HOST_PORT={host_port}"),
        ],
    );
    let shown = f.succeeded(&id).await;
    let logs = f.logs(&id);
    let events = egress_events(&shown);
    println!("{logs}");

    // Allowed: plain HTTP and a TLS tunnel reach the upstream, audited with the rule and bytes.
    assert!(
        probe(&logs, "http_allowed").contains("http-upstream-ok GET /hello HTTP/1.1"),
        "{logs}"
    );
    assert!(
        probe(&logs, "tls_allowed").contains("tls-upstream-ok"),
        "{logs}"
    );
    let e = event(&events, "http.test:80", "rule http.test:80");
    assert_eq!(e["allowed"], true);
    assert_eq!(e["address"], format!("{up}:80"));
    assert!(e["bytes_down"].as_u64().unwrap() > 0, "{e}");
    let e = event(&events, "tls.test:443", "rule tls.test:443");
    assert_eq!(e["allowed"], true);
    assert!(e["bytes_up"].as_u64().unwrap() > 0 && e["bytes_down"].as_u64().unwrap() > 0);

    // Denied, each with its reason in the audit trail and in the task log.
    assert!(probe(&logs, "not_listed").contains("403"), "{logs}");
    denied(
        &events,
        "other.test:80",
        "not in the egress allowlist",
        &logs,
    );
    assert!(probe(&logs, "wrong_port").contains("403"), "{logs}");
    denied(
        &events,
        "http.test:8080",
        "not in the egress allowlist",
        &logs,
    );
    assert!(probe(&logs, "ip_literal").contains("403"), "{logs}");
    denied(
        &events,
        &format!("{up}:80"),
        "only by a network rule",
        &logs,
    );
    assert!(probe(&logs, "metadata_ip").contains("403"), "{logs}");
    denied(
        &events,
        "169.254.169.254:80",
        "only by a network rule",
        &logs,
    );
    assert!(probe(&logs, "metadata_name").contains("403"), "{logs}");
    denied(
        &events,
        "metadata.test:80",
        "the cloud metadata address",
        &logs,
    );
    assert!(probe(&logs, "loopback_name").contains("403"), "{logs}");
    denied(&events, "loop.test:80", "loopback", &logs);
    assert!(
        !probe(&logs, "sni_mismatch").contains("tls-upstream-ok"),
        "{logs}"
    );
    denied(
        &events,
        "tls.test:443",
        "differs from the CONNECT host",
        &logs,
    );
    assert!(probe(&logs, "no_credentials").contains("407"), "{logs}");
    denied(&events, "http.test:80", "missing proxy credentials", &logs);

    // A direct connection, bypassing the proxy: Docker routes it to the gateway, where the host
    // firewall rejects it on the forward path (the sandbox sees "no route to host") and remembers
    // it; the agent audits it at the task's end.
    let direct = probe(&logs, "direct");
    assert!(direct.contains("No route to host"), "{direct}");
    denied(
        &events,
        &format!("{up}:80"),
        "rejected by the host firewall",
        &logs,
    );

    // A host service on 0.0.0.0, through the gateway IP: rejected by the host firewall (audited at
    // the task's end), and refused by the proxy.
    assert!(
        probe(&logs, "host_service_direct").contains("refused"),
        "{logs}"
    );
    let fw = events
        .iter()
        .find(|e| {
            e["destination"]
                .as_str()
                .is_some_and(|d| d.ends_with(&format!(":{host_port}")))
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("rejected by the host firewall"))
        })
        .unwrap_or_else(|| panic!("no firewall rejection audited: {events:#?}"));
    let gw_dest = fw["destination"].as_str().unwrap().to_string();
    denied(&events, &gw_dest, "host firewall", &logs);
    assert!(probe(&logs, "host_service_proxy").contains("403"), "{logs}");
    denied(&events, &gw_dest, "only by a network rule", &logs);
    assert_eq!(
        *host_hits.lock().unwrap(),
        0,
        "the host service was reached"
    );

    // The upstream saw exactly the allowed request, nothing a denial covered.
    let seen = s.upstream.seen.lock().unwrap().http.clone();
    assert_eq!(seen, ["GET /hello HTTP/1.1"]);

    // Every decision is an event, and each event an audit record of the control plane.
    let denials = events.iter().filter(|e| e["allowed"] == false).count();
    assert_eq!(denials, 11, "{events:#?}");
    assert_eq!(events.len(), 13, "{events:#?}");
    audited_like_events(f, &id, &events);

    s.upstream.stop();
    f.no_leftovers().await;
    let left = firewall_tables_of(&[&id]);
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_cannot_use_another_tasks_credentials_or_proxy() {
    let mut s = setup("two-tasks", 2).await;
    let f = &s.f;
    let leaker = f.submit(&s.ws, &["--op", "validate", "--env", "MODE=leak"]);
    let mut leaked = None;
    for _ in 0..2400 {
        if let Some(l) = f
            .logs(&leaker)
            .lines()
            .find_map(|l| l.strip_prefix("LEAK "))
        {
            leaked = Some(l.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaked = leaked.expect("the first task printed its credentials");
    let (reversed, proxy) = leaked.split_once(' ').unwrap();
    let creds: String = reversed.chars().rev().collect();
    assert!(creds.starts_with("task-") && creds.contains(':'), "{creds}");
    // The proxy password is a secret of the task: its log shows it redacted.
    let password = creds.split_once(':').unwrap().1.to_string();
    let leaker_logs = f.logs(&leaker);
    assert!(!leaker_logs.contains(&password), "{leaker_logs}");
    assert!(
        leaker_logs.contains("PROXY_ENV http://task-") && leaker_logs.contains("[REDACTED]@"),
        "{leaker_logs}"
    );

    let thief = f.submit(
        &s.ws,
        &[
            "--op",
            "validate",
            "--env",
            "MODE=steal",
            "--env",
            &format!("STOLEN={creds}"),
            "--env",
            &format!("STOLEN_PROXY={proxy}"),
        ],
    );
    let shown = f.succeeded(&thief).await;
    let logs = f.logs(&thief);
    println!("{logs}");
    // Presented to its own proxy, the other task's credentials are unknown there...
    assert!(probe(&logs, "stolen_credentials").contains("407"), "{logs}");
    let events = egress_events(&shown);
    denied(&events, "http.test:80", "invalid proxy credentials", &logs);
    // ...and the other task's proxy, on its own network's gateway, is a host address this
    // sandbox may not reach: the host firewall resets it, and the attempt is audited.
    assert!(probe(&logs, "other_proxy").contains("refused"), "{logs}");
    denied(&events, proxy, "rejected by the host firewall", &logs);
    audited_like_events(f, &thief, &events);
    assert!(s.upstream.seen.lock().unwrap().http.is_empty());

    let out = f.cp.cli(&["cancel", &leaker]);
    assert!(out.status.success());
    let shown = f.finished(&leaker).await;
    assert_eq!(shown["outcome"], "cancelled", "{shown:#}");
    s.upstream.stop();
    f.no_leftovers().await;
    let left = firewall_tables_of(&[&leaker, &thief]);
    assert!(left.is_empty(), "{left:?}");
}

/// Real tofu/terraform: a provider download is refused by the proxy, and the task log says why
/// next to the tool's own error. The proxy refuses the registry by name, before any DNS lookup,
/// so nothing leaves the host.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_provider_download_says_why_in_the_task_log() {
    let f = Fleet::start(&["egress-tofu"], 1).await;
    let ws = f.write_workspace(
        "provider",
        &[(
            "main.tf",
            r#"terraform {
  required_providers {
    null = { source = "hashicorp/null" }
  }
}
"#,
        )],
    );
    let id = f.submit(&ws, &["--op", "validate"]);
    let shown = f.finished(&id).await;
    assert_eq!(shown["outcome"], "failed", "{shown:#}");
    let logs = f.logs(&id);
    let events = egress_events(&shown);
    let registry = events
        .iter()
        .find(|e| {
            e["destination"]
                .as_str()
                .is_some_and(|d| d.starts_with("registry."))
        })
        .unwrap_or_else(|| panic!("no egress event for the registry: {events:#?}\n{logs}"));
    assert_eq!(registry["allowed"], false);
    let dest = registry["destination"].as_str().unwrap();
    assert!(
        registry["detail"]
            .as_str()
            .unwrap()
            .contains("not in the egress allowlist"),
        "{registry}"
    );
    assert!(
        logs.contains(&format!("delegate: egress denied: {dest}")),
        "{logs}"
    );
    audited_like_events(&f, &id, &events);
    f.no_leftovers().await;
}
