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
//! - Network mirror: the project's own container (no Docker network; an address in 198.18.0.0/15
//!   over a veth pair, as in `egress.rs`: `delegate_tests::upstream`) serves the network mirror
//!   protocol over HTTPS with a certificate from a test CA; the sandbox image used here is the test
//!   image plus that CA as its bundle (what `delegate sandbox build-image` does with the host's
//!   bundle). The allowlist holds only the mirror; every egress event of the task is an allowed
//!   connection to it, and the mirror saw only the provider's index, version document and archive.
//!
//! Needs root (veth, namespaces), Docker and `/bin/busybox` (Debian `busybox-static`, installed by
//! `.ci/install-deps`) for the mirror container's `sleep`.

use delegate_tests::docker::{sandbox_image, BuildContext, Image};
use delegate_tests::fleet::{egress_events, Fleet};
use delegate_tests::process::table;
use delegate_tests::upstream::{busybox, Upstream};
use delegate_tests::RUN_LABEL;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// Submit `validate` of a workspace requiring the fake provider, and insist the task failed at
/// `validate`, after `init` succeeded: the fake package is not a provider. Prints the logs;
/// returns the task's id, `show --json` and logs.
async fn installed_then_validate_fails(f: &Fleet) -> (String, Value, String) {
    let ws = f.write_workspace("fake", &[("main.tf", FAKE_WORKSPACE)]);
    let id = f.submit(&ws, &["--op", "validate"]);
    let shown = f.finished(&id).await;
    let logs = f.logs(&id);
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
    println!("{logs}");
    (id, shown, logs)
}

/// Submit `validate` of a workspace requiring a provider no mirror here has, and insist it failed
/// at `init`; returns the task's `show --json` and its logs.
async fn missing_provider_fails_init(f: &Fleet) -> (Value, String) {
    let ws = f.write_workspace("missing", &[("main.tf", MISSING_WORKSPACE)]);
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
    (shown, logs)
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
    let (id, shown, logs) = installed_then_validate_fails(&f).await;
    // Unpacked layout: installed as a link into the read-only mount, not copied.
    assert!(
        logs.contains("/delegate/providers/registry.terraform.io/example/fake")
            || logs.contains(".terraform/providers/registry.terraform.io/example/fake"),
        "{logs}"
    );
    assert_eq!(egress_events(&shown), Vec::<Value>::new(), "{shown:#}");
    assert_eq!(f.egress_audit(&id), Vec::<Value>::new());

    // A provider the mirror lacks: init fails with tofu's own message naming the mirror, and
    // still nothing tried to leave (no attempt at the public registry, unlike without a mirror;
    // see egress.rs).
    let (shown, logs) = missing_provider_fails_init(&f).await;
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
    f.no_leftovers().await;
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
fn mirror_image(run: &str, ca_pem: &str) -> Image {
    let base = sandbox_image();
    let busybox = busybox();
    let tag = format!("delegate-airgap-sandbox:{run}");
    let dockerfile = format!(
        "FROM {base}\nCOPY ca.pem /etc/ssl/certs/ca-certificates.crt\nCOPY busybox /bin/busybox\n\
         LABEL {RUN_LABEL}={run}\n"
    );
    let mut context = BuildContext::new();
    context
        .file("Dockerfile", dockerfile.as_bytes(), 0o644)
        .file("ca.pem", ca_pem.as_bytes(), 0o644)
        .file("busybox", &busybox, 0o755);
    // The classic builder: it uses the local base image and never asks a registry.
    context.build(&tag, true, "the mirror test image")
}

/// The mirror server: the upstream container (see `delegate_tests::upstream`) with the test's
/// HTTPS server bound (port 443) inside its network namespace. Removed on drop.
struct MirrorServer {
    ns: Upstream,
    /// Request paths served, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl MirrorServer {
    fn start(
        run: &str,
        image: &str,
        host_ip: Ipv4Addr,
        ip: Ipv4Addr,
        tls: Arc<rustls::ServerConfig>,
    ) -> MirrorServer {
        let server = MirrorServer {
            ns: Upstream::start(run, "airgap-mirror", image, host_ip, ip),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        tokio::spawn(serve_mirror(
            server.ns.listen(443),
            tokio_rustls::TlsAcceptor::from(tls),
            Arc::new(network_mirror_files()),
            server.seen.clone(),
        ));
        server
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
    let image = mirror_image(&image_run, &ca.0.pem());
    let (host_side, mirror_ip) = Upstream::address();
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
    let mut server = MirrorServer::start(&f.run, &image.tag, host_side, mirror_ip, tls);

    let (id, shown, logs) = installed_then_validate_fails(&f).await;
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
    let audit = f.egress_audit(&id);
    assert_eq!(audit.len(), events.len(), "{audit:#?}");
    assert!(audit.iter().all(|r| r["action"] == "egress.allowed"
        && r["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("destination {MIRROR_HOST}:443 ")))));

    // A provider the mirror lacks: init fails on the mirror's answer (404 for its index), and
    // the only egress is again the mirror.
    let (shown, logs) = missing_provider_fails_init(&f).await;
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

    server.ns.stop();
    f.no_leftovers().await;
}
