//! End to end: air-gapped pools. The agent (real control plane + `delegate` binary + Docker + the
//! real tofu/terraform in the sandbox image) is configured with a provider mirror, and `init`
//! installs a provider from it, with no other egress.
//!
//! The provider is data: a tiny package named like a provider (`example/fake` 0.1.0) whose
//! executable is a two-line shell script. `init` only installs it (finds it in the mirror,
//! checks it, links or unpacks it into `.terraform/providers`, records it in the lock file), which
//! is what is under test; the `validate` step after it then fails loading the package's schema,
//! because it is not a real provider, and that failure shows tofu resolved the provider to the
//! mirror's package. No tofu behaviour is faked.
//!
//! - Filesystem mirror: a directory on the host, in the unpacked layout, named by
//!   `[sandbox] provider_filesystem_mirror`; the agent mounts it read-only into the steps. The
//!   egress allowlist is empty, and the task has no egress event at all.
//! - Network mirror: the project's own container (no Docker network; an address in
//!   198.18.0.0/15 over a veth pair, as in `egress.rs`) serves the network mirror protocol over
//!   HTTPS with a certificate from a test CA; the sandbox image used here is the test image plus
//!   that CA as its bundle (what `delegate sandbox build-image` does with the host's bundle). The
//!   allowlist holds only the mirror; every egress event of the task is an allowed connection to
//!   it, and the mirror saw only the provider's index, version document and archive.
//!
//! Needs root (veth, namespaces), Docker and `/bin/busybox` (Debian `busybox-static`, installed by
//! `.ci/install-deps`) for the mirror container's `sleep`.

use delegate_tests::docker::sandbox_image;
use delegate_tests::fleet::Fleet;
use delegate_tests::process::table;
use delegate_tests::RUN_LABEL;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BUSYBOX: &str = "/bin/busybox";
/// The fake provider's executable: data, never a working provider.
const FAKE_PROVIDER: &[u8] =
    b"#!/bin/sh\n# Not a provider: a package for the Delegate air-gap tests to install.\nexit 1\n";
const MIRROR_HOST: &str = "mirror.test";

/// tofu's platform name for this machine.
fn platform() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "linux_arm64"
    } else {
        "linux_amd64"
    }
}

/// A workspace requiring `example/fake` 0.1.0 (besides the built-in `terraform_data`).
const FAKE_WORKSPACE: &str = r#"terraform {
  required_providers {
    fake = {
      source  = "example/fake"
      version = "0.1.0"
    }
  }
}

resource "terraform_data" "x" {
  input = "air-gapped"
}
"#;

/// A workspace requiring a provider no mirror here has.
const MISSING_WORKSPACE: &str = r#"terraform {
  required_providers {
    null = { source = "hashicorp/null" }
  }
}
"#;

fn write_workspace(dir: &Path, main_tf: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("main.tf"), main_tf).unwrap();
}

/// The task's egress events.
fn egress_events(shown: &Value) -> Vec<Value> {
    shown["events"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|e| e["event"].clone())
                .filter(|e| e["kind"] == "egress")
                .collect()
        })
        .unwrap_or_default()
}

/// The control plane's audit records of a task's egress decisions.
fn egress_audit(f: &Fleet, task: &str) -> Vec<Value> {
    match f.cp.cli_json(&["audit", "--task", task, "--json"]) {
        Value::Array(a) => a
            .into_iter()
            .filter(|r| {
                r["action"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("egress."))
            })
            .collect(),
        other => panic!("audit --json is not an array: {other}"),
    }
}

async fn no_leftovers(f: &Fleet) {
    for _ in 0..240 {
        if f.leftovers().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("labelled Docker objects left behind: {:?}", f.leftovers());
}

/// The task failed at `validate`, after `init` succeeded: the fake package is not a provider.
fn failed_after_init(f: &Fleet, id: &str, shown: &Value) -> String {
    let logs = f.logs(id);
    assert_eq!(shown["outcome"], "failed", "{shown:#}\n{logs}");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("step `validate` exited with code 1"),
        "init did not succeed: {reason}\n{logs}"
    );
    assert!(logs.contains("Installing example/fake v0.1.0..."), "{logs}");
    assert!(logs.contains("Installed example/fake v0.1.0"), "{logs}");
    // validate then started the installed package (it cannot speak the plugin protocol).
    assert!(
        logs.contains("registry.terraform.io/example/fake"),
        "{logs}"
    );
    logs
}

// ---------------------------------------------------------------------------------------------
// Filesystem mirror
// ---------------------------------------------------------------------------------------------

/// A mirror directory in the unpacked layout, readable by the sandbox user.
fn filesystem_mirror(root: &Path) -> PathBuf {
    let dir = root
        .join("registry.terraform.io/example/fake/0.1.0")
        .join(platform());
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("terraform-provider-fake_v0.1.0");
    std::fs::write(&exe, FAKE_PROVIDER).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = dir.as_path();
    loop {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        if d == root {
            break;
        }
        d = d.parent().unwrap();
    }
    exe
}

#[tokio::test(flavor = "multi_thread")]
async fn init_installs_from_a_filesystem_mirror_with_no_egress_at_all() {
    let mirror = tempfile::tempdir().unwrap();
    let exe = filesystem_mirror(mirror.path());
    let mirror_path = mirror.path().to_str().unwrap().to_string();
    let f = Fleet::start_with(&["airgap-fs"], 1, |doc| {
        table(doc, "sandbox").insert(
            "provider_filesystem_mirror".into(),
            toml::Value::String(mirror_path.clone()),
        );
        // Nothing is allowed out: the mirror is a read-only directory.
        table(doc, "egress").insert("allow".into(), toml::Value::Array(vec![]));
    })
    .await;

    // A provider in the mirror: installed by init from there.
    let ws = f.cp.path().join("workspaces").join("fake");
    write_workspace(&ws, FAKE_WORKSPACE);
    let id = f.submit(&ws, &["--op", "validate"]);
    let shown = f.finished(&id).await;
    let logs = failed_after_init(&f, &id, &shown);
    println!("{logs}");
    // Unpacked layout: installed as a link into the read-only mount, not copied.
    assert!(
        logs.contains("/delegate/providers/registry.terraform.io/example/fake")
            || logs.contains(".terraform/providers/registry.terraform.io/example/fake"),
        "{logs}"
    );
    assert_eq!(egress_events(&shown), Vec::<Value>::new(), "{shown:#}");
    assert_eq!(egress_audit(&f, &id), Vec::<Value>::new());

    // A provider the mirror lacks: init fails with tofu's own message naming the mirror, and
    // still nothing tried to leave (no attempt at the public registry, unlike without a mirror;
    // see egress.rs).
    let ws = f.cp.path().join("workspaces").join("missing");
    write_workspace(&ws, MISSING_WORKSPACE);
    let id = f.submit(&ws, &["--op", "validate"]);
    let shown = f.finished(&id).await;
    let logs = f.logs(&id);
    assert_eq!(shown["outcome"], "failed", "{shown:#}");
    assert!(
        shown["reason"]
            .as_str()
            .is_some_and(|r| r.contains("step `init` exited with code 1")),
        "{shown:#}"
    );
    assert!(
        logs.contains("registry.terraform.io/hashicorp/null was not found")
            && logs.contains("/delegate/providers"),
        "{logs}"
    );
    assert_eq!(egress_events(&shown), Vec::<Value>::new(), "{shown:#}");

    // A workspace with only built-in resources plans as before under the mirror configuration.
    let hello = f.workspace("hello");
    let id = f.submit(&hello, &["--op", "plan"]);
    f.succeeded(&id).await;

    // The mirror is untouched (it was mounted read-only).
    assert_eq!(std::fs::read(&exe).unwrap(), FAKE_PROVIDER);
    let entries: Vec<_> = std::fs::read_dir(mirror.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["registry.terraform.io"]);
    no_leftovers(&f).await;
}

// ---------------------------------------------------------------------------------------------
// Network mirror
// ---------------------------------------------------------------------------------------------

/// CRC-32 (IEEE), for the zip archive.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip archive holding one executable file, stored (not compressed).
fn zip_one(name: &str, data: &[u8]) -> Vec<u8> {
    let crc = crc32(data);
    let (n, len) = (name.len() as u16, data.len() as u32);
    let mut z = Vec::new();
    // Local file header.
    z.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    for v in [20u16, 0, 0, 0, 0x21] {
        z.extend_from_slice(&v.to_le_bytes()); // version, flags, stored, time, date
    }
    z.extend_from_slice(&crc.to_le_bytes());
    z.extend_from_slice(&len.to_le_bytes());
    z.extend_from_slice(&len.to_le_bytes());
    z.extend_from_slice(&n.to_le_bytes());
    z.extend_from_slice(&0u16.to_le_bytes());
    z.extend_from_slice(name.as_bytes());
    z.extend_from_slice(data);
    // Central directory.
    let cd = z.len() as u32;
    z.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
    for v in [(3u16 << 8) | 20, 20, 0, 0, 0, 0x21] {
        z.extend_from_slice(&v.to_le_bytes()); // made by unix, version, flags, stored, time, date
    }
    z.extend_from_slice(&crc.to_le_bytes());
    z.extend_from_slice(&len.to_le_bytes());
    z.extend_from_slice(&len.to_le_bytes());
    for v in [n, 0, 0, 0, 0] {
        z.extend_from_slice(&v.to_le_bytes()); // name, extra, comment, disk, internal attrs
    }
    z.extend_from_slice(&(0o100755u32 << 16).to_le_bytes());
    z.extend_from_slice(&0u32.to_le_bytes());
    z.extend_from_slice(name.as_bytes());
    let cd_len = z.len() as u32 - cd;
    // End of central directory.
    z.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    for v in [0u16, 0, 1, 1] {
        z.extend_from_slice(&v.to_le_bytes());
    }
    z.extend_from_slice(&cd_len.to_le_bytes());
    z.extend_from_slice(&cd.to_le_bytes());
    z.extend_from_slice(&0u16.to_le_bytes());
    z
}

/// The network mirror's files, by request path, under `/providers/`.
fn network_mirror_files() -> BTreeMap<String, (&'static str, Vec<u8>)> {
    let base = "/providers/registry.terraform.io/example/fake";
    let zip_name = format!("terraform-provider-fake_0.1.0_{}.zip", platform());
    let zip = zip_one("terraform-provider-fake_v0.1.0", FAKE_PROVIDER);
    let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &zip));
    let version = serde_json::json!({
        "archives": { platform(): { "url": zip_name, "hashes": [format!("zh:{sha}")] } }
    });
    BTreeMap::from([
        (
            format!("{base}/index.json"),
            ("application/json", br#"{"versions":{"0.1.0":{}}}"#.to_vec()),
        ),
        (
            format!("{base}/0.1.0.json"),
            ("application/json", version.to_string().into_bytes()),
        ),
        (format!("{base}/{zip_name}"), ("application/zip", zip)),
    ])
}

/// The sandbox image of the network test: the test image with the test CA as its CA bundle (and
/// busybox, for the mirror container's `sleep`). Removed on drop.
struct MirrorImage {
    tag: String,
}

impl MirrorImage {
    fn build(run: &str, ca_pem: &str) -> MirrorImage {
        let base = sandbox_image();
        let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
            panic!("{BUSYBOX} is needed (Debian busybox-static, see .ci/install-deps): {e}")
        });
        let tag = format!("delegate-airgap-sandbox:{run}");
        let dockerfile = format!(
            "FROM {base}\nCOPY ca.pem /etc/ssl/certs/ca-certificates.crt\nCOPY busybox /bin/busybox\n\
             LABEL {RUN_LABEL}={run}\n"
        );
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data, mode) in [
            ("Dockerfile", dockerfile.as_bytes(), 0o644),
            ("ca.pem", ca_pem.as_bytes(), 0o644),
            ("busybox", &busybox[..], 0o755),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, path, data).unwrap();
        }
        let context = tar.into_inner().unwrap();
        // The classic builder: it uses the local base image and never asks a registry.
        let mut child = Command::new("docker")
            .args(["build", "-q", "-t", &tag, "-"])
            .env("DOCKER_BUILDKIT", "0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&context).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "building the mirror test image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        MirrorImage { tag }
    }
}

impl Drop for MirrorImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.tag])
            .output();
    }
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random_u32() -> u32 {
    u32::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..4].try_into().unwrap())
}

/// The mirror server: a container without a Docker network, reached over a veth pair at an
/// address of 198.18.0.0/15, with the test's HTTPS server bound (port 443) inside its network
/// namespace. The container carries the run label; the veth goes with its namespace.
struct MirrorServer {
    container: String,
    veth: String,
    /// Request paths served, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl MirrorServer {
    /// Pick the address first (the agent's configuration names it), start later.
    fn address() -> (Ipv4Addr, Ipv4Addr) {
        let n = random_u32();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + ((n % 32768) << 2);
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    async fn start(
        run: &str,
        image: &str,
        host_ip: Ipv4Addr,
        ip: Ipv4Addr,
        tls: Arc<rustls::ServerConfig>,
    ) -> MirrorServer {
        let name = format!("delegate-airgap-mirror-{run}");
        let label = format!("{RUN_LABEL}={run}");
        sh(
            "docker",
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                &label,
                "--network",
                "none",
                "--entrypoint",
                "/bin/busybox",
                image,
                "sleep",
                "3600",
            ],
        );
        let pid = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", &name])
            .output()
            .unwrap();
        let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
        assert!(pid.parse::<u32>().is_ok_and(|p| p > 0), "pid {pid:?}");
        let tag = format!("{:06x}", random_u32() & 0xff_ffff);
        let (veth, peer) = (format!("dlau{tag}"), format!("dlac{tag}"));
        let server = MirrorServer {
            container: name,
            veth: veth.clone(),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        let netns = format!("--net=/proc/{pid}/ns/net");
        sh(
            "ip",
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        );
        sh("ip", &["link", "set", &peer, "netns", &pid]);
        sh(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &veth],
        );
        sh("ip", &["link", "set", &veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec![netns.as_str(), "ip"];
            all.extend_from_slice(args);
            sh("nsenter", &all);
        };
        inside(&["addr", "add", &format!("{ip}/30"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);

        // Bind inside the container's namespace from a thread that enters it; the socket stays
        // there when the thread ends.
        let ns_path = format!("/proc/{pid}/ns/net");
        let listener = std::thread::spawn(move || {
            let ns = std::fs::File::open(ns_path).unwrap();
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let l = std::net::TcpListener::bind(("0.0.0.0", 443)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .unwrap();
        tokio::spawn(serve_mirror(
            TcpListener::from_std(listener).unwrap(),
            tokio_rustls::TlsAcceptor::from(tls),
            Arc::new(network_mirror_files()),
            server.seen.clone(),
        ));
        server
    }

    fn stop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        // Gone with the namespace already; this only covers a container that would not die.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

impl Drop for MirrorServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One GET per connection (`Connection: close`), answered from `files`, 404 otherwise.
async fn serve_mirror(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    files: Arc<BTreeMap<String, (&'static str, Vec<u8>)>>,
    seen: Arc<Mutex<Vec<String>>>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (tls, files, seen) = (tls.clone(), files.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(30), tls.accept(tcp)).await
            else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let path = head
                .lines()
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("")
                .to_string();
            seen.lock().unwrap().push(path.clone());
            let (status, ctype, body) = match files.get(&path) {
                Some((ctype, body)) => ("200 OK", *ctype, body.clone()),
                None => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.write_all(&body).await;
            let _ = s.shutdown().await;
        });
    }
}

/// A server certificate for the mirror's name, signed by `ca`.
fn mirror_cert(ca: &(rcgen::Certificate, rcgen::KeyPair)) -> delegate_tests::certs::Issued {
    let mut params = rcgen::CertificateParams::new(vec![MIRROR_HOST.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, MIRROR_HOST);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    delegate_tests::certs::Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn init_installs_from_a_network_mirror_and_reaches_nothing_else() {
    let ca = delegate_tests::certs::new_ca("delegate air-gap test CA");
    let tls = delegate_tests::certs::server_config(
        &mirror_cert(&ca),
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    );
    let image_run = delegate_tests::run_id();
    let image = MirrorImage::build(&image_run, &ca.0.pem());
    let (host_side, mirror_ip) = MirrorServer::address();
    let tag = image.tag.clone();
    let f = Fleet::start_with(&["airgap-net"], 1, |doc| {
        let sb = table(doc, "sandbox");
        sb.insert("image".into(), toml::Value::String(tag.clone()));
        sb.insert(
            "provider_mirror".into(),
            toml::Value::String(format!("https://{MIRROR_HOST}/providers/")),
        );
        let egress = table(doc, "egress");
        egress.insert(
            "allow".into(),
            toml::Value::Array(vec![toml::Value::String(format!("{MIRROR_HOST}:443"))]),
        );
        let mut hosts = toml::Table::new();
        hosts.insert(
            MIRROR_HOST.into(),
            toml::Value::String(mirror_ip.to_string()),
        );
        egress.insert("hosts".into(), toml::Value::Table(hosts));
    })
    .await;
    let mut server = MirrorServer::start(&f.run, &image.tag, host_side, mirror_ip, tls).await;

    let ws = f.cp.path().join("workspaces").join("fake");
    write_workspace(&ws, FAKE_WORKSPACE);
    let id = f.submit(&ws, &["--op", "validate"]);
    let shown = f.finished(&id).await;
    let logs = failed_after_init(&f, &id, &shown);
    println!("{logs}");
    // tofu checked the archive against the mirror's `zh:` hash.
    assert!(
        logs.contains("Installed example/fake v0.1.0 (verified checksum)"),
        "{logs}"
    );

    // The mirror served the provider's documents and archive, and nothing else was asked of it.
    let seen = server.seen.lock().unwrap().clone();
    let files = network_mirror_files();
    for path in files.keys() {
        assert!(seen.contains(path), "{path} not requested; seen: {seen:?}");
    }
    assert!(
        seen.iter().all(|p| files.contains_key(p)),
        "unexpected requests: {seen:?}"
    );

    // Every egress decision of the task is an allowed connection to the mirror, each audited.
    let events = egress_events(&shown);
    assert!(!events.is_empty(), "{shown:#}");
    println!("mirror requests: {seen:?}; egress events: {}", events.len());
    for e in &events {
        assert_eq!(e["destination"], format!("{MIRROR_HOST}:443"), "{e}");
        assert_eq!(e["allowed"], true, "{e}");
        assert_eq!(e["address"], format!("{mirror_ip}:443"), "{e}");
    }
    let audit = egress_audit(&f, &id);
    assert_eq!(audit.len(), events.len(), "{audit:#?}");
    assert!(audit.iter().all(|r| r["action"] == "egress.allowed"
        && r["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("destination {MIRROR_HOST}:443 ")))));

    // A provider the mirror lacks: init fails on the mirror's answer (404 for its index), and
    // the only egress is again the mirror.
    let ws = f.cp.path().join("workspaces").join("missing");
    write_workspace(&ws, MISSING_WORKSPACE);
    let id = f.submit(&ws, &["--op", "validate"]);
    let shown = f.finished(&id).await;
    let logs = f.logs(&id);
    assert_eq!(shown["outcome"], "failed", "{shown:#}");
    assert!(
        shown["reason"]
            .as_str()
            .is_some_and(|r| r.contains("step `init` exited with code 1")),
        "{shown:#}\n{logs}"
    );
    assert!(logs.contains("hashicorp/null"), "{logs}");
    let events = egress_events(&shown);
    assert!(
        events
            .iter()
            .all(|e| e["destination"] == format!("{MIRROR_HOST}:443") && e["allowed"] == true),
        "{events:#?}"
    );
    assert!(server
        .seen
        .lock()
        .unwrap()
        .contains(&"/providers/registry.terraform.io/hashicorp/null/index.json".to_string()));

    server.stop();
    no_leftovers(&f).await;
}
