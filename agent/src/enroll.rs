//! `delegate enroll`: turn a one-time bootstrap token into this host's identity.
//!
//! The private key (ECDSA P-256, rcgen) is generated here and never leaves the host: only a CSR is
//! sent. The enrollment endpoint (`POST <url>/api/v1/enroll`, see `docs/enrollment.md`) is reached
//! over TLS 1.3 and trusted only through the pinned hash of the control plane's CA: the server must
//! present that CA in its chain and its certificate must verify against it
//! ([`crate::tls::CaPinnedVerifier`]); the CA returned in the answer must have the same hash. The
//! answer's certificate must hold our key and chain to that CA. Only then are the key (0600), the
//! certificate, the CA and a ready `agent.toml` written (each atomically) into the output
//! directory, which is created 0700.
//!
//! An output directory that already holds an enrolled identity ([`existing_identity`]: `agent.key`,
//! `agent.pem` and `agent.toml`) is refused; with `--if-absent` the command accepts it instead and
//! exits 0 without contacting the control plane (so the token is not spent), which makes enrolling
//! idempotent for an init container or a provisioning script that runs again.
//!
//! Must never: send or log the key, log the token (it is a secret until used; it appears in no
//! error), overwrite an existing key, or write anything when enrollment failed.

use crate::renew::{write_atomic, RenewError};
use crate::tls;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Why enrollment failed.
#[derive(Debug, Error)]
pub enum EnrollError {
    /// Bad arguments; not retryable as given.
    #[error("{0}")]
    Usage(String),
    /// The control plane refused the token (used, expired, unknown): get a new token.
    #[error("the control plane refused the enrollment (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// Network or TLS trouble (retryable, unless it is a pin mismatch).
    #[error("cannot reach the enrollment endpoint {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The control plane answered something unusable.
    #[error("unusable answer from the control plane: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Local(String),
}

impl EnrollError {
    /// Worth trying again with the same token (network trouble or a server error).
    pub fn is_retryable(&self) -> bool {
        match self {
            EnrollError::Connect { reason, .. } => !reason.contains("--ca-sha256"),
            EnrollError::Refused { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

impl From<RenewError> for EnrollError {
    fn from(e: RenewError) -> Self {
        EnrollError::Local(e.to_string())
    }
}

/// What the operator asked for.
#[derive(Clone)]
pub struct EnrollRequest {
    /// The control plane's API base URL (`https://host:port`), as `tokens create --json` prints.
    pub url: String,
    pub token: String,
    /// SHA-256 (hex) of the control plane CA's DER.
    pub ca_sha256: String,
    pub name: String,
    pub out: PathBuf,
    /// `data_dir` for the written `agent.toml`; default `<out>/data`.
    pub data_dir: Option<PathBuf>,
    pub timeout: Duration,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("name", &self.name)
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

/// The request body.
#[derive(Serialize)]
struct Body<'a> {
    token: &'a str,
    csr_pem: &'a str,
    name: &'a str,
}

/// The success answer.
#[derive(Debug, Clone, Deserialize)]
pub struct EnrollResponse {
    pub cert_pem: String,
    pub ca_pem: String,
    /// The agent endpoint, `wss://...`.
    pub agent_url: String,
    pub pool: String,
    /// The name the control plane issued the certificate for.
    pub name: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub name: String,
    pub pool: String,
    pub agent_url: String,
    pub config: PathBuf,
    pub not_after: std::time::SystemTime,
}

/// `https://host[:port][/prefix]` → `https://host[:port][/prefix]/api/v1/enroll`. A URL already
/// ending in `/api/v1/enroll` is used as it is. Only https.
pub fn enroll_endpoint(url: &str) -> Result<reqwest::Url, EnrollError> {
    let u = url.trim();
    if u.starts_with("wss://") || u.starts_with("ws://") {
        return Err(EnrollError::Usage(format!(
            "--url {u:?} is the agent endpoint; enrollment uses the control plane's HTTPS API URL (the \"url\" printed by `delegate-cp tokens create --json`, e.g. https://cp.example.internal:8444)"
        )));
    }
    let parsed = reqwest::Url::parse(u)
        .map_err(|e| EnrollError::Usage(format!("--url {u:?} is not a valid URL: {e}")))?;
    if parsed.scheme() != "https" {
        return Err(EnrollError::Usage(format!(
            "--url must be an https:// URL, got {u:?}"
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(EnrollError::Usage(
            "--url must not carry user information".into(),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(EnrollError::Usage(format!("--url {u:?} has no host")));
    }
    let path = parsed.path().trim_end_matches('/');
    let full = if path.ends_with("/api/v1/enroll") {
        parsed.clone()
    } else {
        let mut p = parsed.clone();
        p.set_path(&format!("{path}/api/v1/enroll"));
        p.set_query(None);
        p
    };
    Ok(full)
}

/// Parse `--ca-sha256`: 64 hex digits (`:` separators and `sha256:` prefix allowed).
pub fn parse_ca_sha256(s: &str) -> Result<[u8; 32], EnrollError> {
    let s = s.trim();
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    hex::decode(&clean)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            EnrollError::Usage(
                "--ca-sha256 must be 64 hex digits (the SHA-256 of the control plane CA certificate's DER, as `delegate-cp tokens create --json` prints it)".into(),
            )
        })
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `agent.toml` written beside the certificate files (paths relative to it).
pub fn render_agent_toml(resp: &EnrollResponse, data_dir: &Path) -> String {
    format!(
        "# Written by `delegate enroll`. The certificate files are beside this file; the agent\n\
         # renews agent.pem over its link before it expires (the key never changes).\n\
         data_dir = {data_dir}\n\
         \n\
         [control_plane]\n\
         url = {url}\n\
         ca_file = \"ca.pem\"\n\
         cert_file = \"agent.pem\"\n\
         key_file = \"agent.key\"\n\
         \n\
         [agent]\n\
         name = {name}\n\
         pool = {pool}\n",
        data_dir = toml_string(&data_dir.to_string_lossy()),
        url = toml_string(&resp.agent_url),
        name = toml_string(&resp.name),
        pool = toml_string(&resp.pool),
    )
}

/// Check the answer against what we sent and pinned.
pub fn check_answer(
    resp: &EnrollResponse,
    key: &rcgen::KeyPair,
    pin: [u8; 32],
) -> Result<std::time::SystemTime, EnrollError> {
    let bad = |m: String| EnrollError::BadAnswer(m);
    let ca_path = Path::new("ca_pem");
    let cas =
        tls::parse_cert_pem(resp.ca_pem.as_bytes(), ca_path).map_err(|e| bad(e.to_string()))?;
    let Some(ca) = cas.iter().find(|c| tls::cert_sha256(c) == pin) else {
        return Err(bad("ca_pem is not the CA pinned by --ca-sha256".into()));
    };
    let chain = tls::parse_cert_pem(resp.cert_pem.as_bytes(), Path::new("cert_pem"))
        .map_err(|e| bad(e.to_string()))?;
    let leaf = &chain[0];
    let spki = tls::spki_sha256(leaf).map_err(bad)?;
    let ours = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
    if spki[..] != *ours.as_ref() {
        return Err(bad("cert_pem is not for the key this host generated".into()));
    }
    // The certificate must be a client certificate issued by the pinned CA, valid now.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| bad(format!("ca_pem: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        tls::provider(),
    )
    .build()
    .map_err(|e| bad(e.to_string()))?;
    verifier
        .verify_client_cert(leaf, &chain[1..], rustls::pki_types::UnixTime::now())
        .map_err(|e| {
            bad(format!(
                "cert_pem does not verify against the pinned CA: {e}"
            ))
        })?;
    crate::config::parse_wss_url(&resp.agent_url).map_err(|e| bad(format!("agent_url: {e}")))?;
    for (what, v) in [("name", &resp.name), ("pool", &resp.pool)] {
        if !valid_name(v) {
            return Err(bad(format!("{what} {v:?} is not a valid agent {what}")));
        }
    }
    tls::cert_validity(leaf).map(|v| v.not_after).map_err(bad)
}

/// Walk an error's sources into one line (reqwest hides the TLS reason in its sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn valid_name(n: &str) -> bool {
    crate::config::check_name(n).is_ok()
}

/// This host's short name, the default `--name`.
pub fn default_name() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let short = h.trim().split('.').next()?.to_string();
    valid_name(&short).then_some(short)
}

/// The files that make an enrolled identity in an output directory (`ca.pem` may be replaced by
/// `control_plane.ca_file` pointing elsewhere, so it is not required).
pub const IDENTITY_FILES: [&str; 3] = ["agent.key", "agent.pem", "agent.toml"];

/// `<out>/agent.toml` when `out` already holds an enrolled identity (every one of
/// [`IDENTITY_FILES`]); `None` when any is missing. Reads nothing but file metadata.
pub fn existing_identity(out: &Path) -> Option<PathBuf> {
    IDENTITY_FILES
        .iter()
        .all(|f| out.join(f).is_file())
        .then(|| out.join("agent.toml"))
}

/// Enroll: key, CSR, POST, checks, files.
pub async fn enroll(req: &EnrollRequest) -> Result<Enrolled, EnrollError> {
    let endpoint = enroll_endpoint(&req.url)?;
    let pin = parse_ca_sha256(&req.ca_sha256)?;
    if !valid_name(&req.name) {
        return Err(EnrollError::Usage(format!(
            "--name {:?} must start with a letter or digit and hold only letters, digits, '.', '_' and '-'",
            req.name
        )));
    }
    if req.token.trim().is_empty() {
        return Err(EnrollError::Usage("--token is empty".into()));
    }
    let key_path = req.out.join("agent.key");
    if key_path.exists() {
        let missing: Vec<&str> = IDENTITY_FILES
            .iter()
            .copied()
            .filter(|f| !req.out.join(f).is_file())
            .collect();
        return Err(EnrollError::Usage(if missing.is_empty() {
            format!(
                "{} already exists: this directory holds an enrolled identity; remove it first or choose another --out (or pass --if-absent to keep it)",
                key_path.display()
            )
        } else {
            format!(
                "{} already exists but {} does not: an earlier enrollment did not finish; remove the key and enroll again (with a new token if that one was used)",
                key_path.display(),
                missing.join(" and ")
            )
        }));
    }

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| EnrollError::Local(format!("cannot generate a key: {e}")))?;
    let csr = tls::csr_pem(&key, &req.name).map_err(EnrollError::Local)?;

    let mut tls_config =
        tls::ca_pinned_client_config(pin).map_err(|e| EnrollError::Local(e.to_string()))?;
    tls_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls_config)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(req.timeout)
        .build()
        .map_err(|e| EnrollError::Local(format!("cannot build the HTTPS client: {}", chain(&e))))?;
    let shown = endpoint.to_string();
    let answer = client
        .post(endpoint)
        .json(&Body {
            token: req.token.trim(),
            csr_pem: &csr,
            name: &req.name,
        })
        .send()
        .await
        .map_err(|e| EnrollError::Connect {
            url: shown.clone(),
            reason: chain(&e).replace(req.token.trim(), "<token>"),
        })?;
    let status = answer.status();
    let bytes = answer.bytes().await.map_err(|e| EnrollError::Connect {
        url: shown.clone(),
        reason: chain(&e),
    })?;
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| {
                let t = String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                    .trim()
                    .to_string();
                if t.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_string()
                } else {
                    t
                }
            })
            .replace(req.token.trim(), "<token>");
        return Err(EnrollError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    let resp: EnrollResponse = serde_json::from_slice(&bytes)
        .map_err(|e| EnrollError::BadAnswer(format!("not the expected JSON: {e}")))?;
    let not_after = check_answer(&resp, &key, pin)?;

    write_bundle(&req.out, &key, &resp, req.data_dir.clone())?;
    Ok(Enrolled {
        name: resp.name.clone(),
        pool: resp.pool.clone(),
        agent_url: resp.agent_url.clone(),
        config: req.out.join("agent.toml"),
        not_after,
    })
}

/// Write the bundle: directory 0700, key 0600 (first, and never over an existing one), then the
/// certificates and `agent.toml`.
pub fn write_bundle(
    out: &Path,
    key: &rcgen::KeyPair,
    resp: &EnrollResponse,
    data_dir: Option<PathBuf>,
) -> Result<(), EnrollError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(|e| EnrollError::Local(format!("cannot create {}: {e}", out.display())))?;
    let key_path = out.join("agent.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| EnrollError::Local(format!("cannot create {}: {e}", key_path.display())))?;
    let pem = zeroize::Zeroizing::new(key.serialize_pem());
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| EnrollError::Local(format!("cannot write {}: {e}", key_path.display())))?;
    write_atomic(&out.join("ca.pem"), resp.ca_pem.as_bytes(), 0o644)?;
    write_atomic(&out.join("agent.pem"), resp.cert_pem.as_bytes(), 0o644)?;
    let abs_out = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let data_dir = data_dir.unwrap_or_else(|| abs_out.join("data"));
    write_atomic(
        &out.join("agent.toml"),
        render_agent_toml(resp, &data_dir).as_bytes(),
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    #[test]
    fn endpoints() {
        assert_eq!(
            enroll_endpoint("https://cp.internal:8444")
                .unwrap()
                .as_str(),
            "https://cp.internal:8444/api/v1/enroll"
        );
        assert_eq!(
            enroll_endpoint("https://cp.internal:8444/")
                .unwrap()
                .as_str(),
            "https://cp.internal:8444/api/v1/enroll"
        );
        assert_eq!(
            enroll_endpoint("https://cp/prefix/api/v1/enroll")
                .unwrap()
                .as_str(),
            "https://cp/prefix/api/v1/enroll"
        );
        assert!(enroll_endpoint("http://cp:8444")
            .unwrap_err()
            .to_string()
            .contains("https://"));
        assert!(enroll_endpoint("wss://cp:8443/v1/agent")
            .unwrap_err()
            .to_string()
            .contains("HTTPS API URL"));
        assert!(enroll_endpoint("https://u:p@cp/")
            .unwrap_err()
            .to_string()
            .contains("user"));
        assert!(enroll_endpoint("not a url").is_err());
    }

    #[test]
    fn ca_hashes() {
        assert_eq!(parse_ca_sha256(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert_eq!(
            parse_ca_sha256(&format!("sha256:{}", "AB".repeat(32))).unwrap(),
            [0xab; 32]
        );
        assert_eq!(
            parse_ca_sha256(&vec!["ab"; 32].join(":")).unwrap(),
            [0xab; 32]
        );
        assert!(parse_ca_sha256("abc").is_err());
    }

    #[test]
    fn toml_is_escaped_and_loads() {
        let resp = EnrollResponse {
            cert_pem: String::new(),
            ca_pem: String::new(),
            agent_url: "wss://cp.internal:8443/v1/agent".into(),
            pool: "airgap".into(),
            name: "vm-1".into(),
        };
        let text = render_agent_toml(&resp, Path::new("/var/lib/delegate \"x\""));
        assert!(
            text.contains("data_dir = \"/var/lib/delegate \\\"x\\\"\""),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let c = crate::config::load_str(
            &text,
            &dir.path().join("agent.toml"),
            dir.path(),
            Some(Default::default()),
        )
        .unwrap();
        assert_eq!(c.agent.name, "vm-1");
        assert_eq!(c.agent.pool, "airgap");
        assert_eq!(c.control_plane.cert_file, dir.path().join("agent.pem"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/delegate \"x\""));
    }

    fn ca() -> (rcgen::Certificate, KeyPair) {
        let k = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "enroll CA");
        (p.self_signed(&k).unwrap(), k)
    }

    fn client_cert(ca: &(rcgen::Certificate, KeyPair), key: &KeyPair) -> String {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "vm-1");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.signed_by(key, &ca.0, &ca.1).unwrap().pem()
    }

    #[test]
    fn answers_are_checked() {
        let ca1 = ca();
        let key = KeyPair::generate().unwrap();
        let pin = tls::cert_sha256(ca1.0.der());
        let good = EnrollResponse {
            cert_pem: client_cert(&ca1, &key),
            ca_pem: ca1.0.pem(),
            agent_url: "wss://cp:8443/v1/agent".into(),
            pool: "default".into(),
            name: "vm-1".into(),
        };
        check_answer(&good, &key, pin).unwrap();
        let other_key = KeyPair::generate().unwrap();
        let e = check_answer(&good, &other_key, pin)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not for the key"), "{e}");
        let e = check_answer(&good, &key, [0; 32]).unwrap_err().to_string();
        assert!(e.contains("--ca-sha256"), "{e}");
        let ca2 = ca();
        let mut foreign = good.clone();
        foreign.cert_pem = client_cert(&ca2, &key);
        let e = check_answer(&foreign, &key, pin).unwrap_err().to_string();
        assert!(e.contains("does not verify"), "{e}");
        let mut bad_url = good.clone();
        bad_url.agent_url = "http://cp/".into();
        assert!(check_answer(&bad_url, &key, pin)
            .unwrap_err()
            .to_string()
            .contains("agent_url"));
        let mut bad_name = good;
        bad_name.name = "../etc".into();
        assert!(check_answer(&bad_name, &key, pin)
            .unwrap_err()
            .to_string()
            .contains("name"));
    }

    #[test]
    fn bundle_is_private_and_never_overwrites_a_key() {
        use std::os::unix::fs::PermissionsExt;
        let ca1 = ca();
        let key = KeyPair::generate().unwrap();
        let resp = EnrollResponse {
            cert_pem: client_cert(&ca1, &key),
            ca_pem: ca1.0.pem(),
            agent_url: "wss://cp:8443/v1/agent".into(),
            pool: "default".into(),
            name: "vm-1".into(),
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        write_bundle(&out, &key, &resp, None).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join("agent.key")), 0o600);
        let c = crate::config::load(&out.join("agent.toml")).unwrap();
        assert!(c.check_files().is_empty(), "{:?}", c.check_files());
        assert_eq!(c.data_dir, out.join("data"));
        let e = write_bundle(&out, &key, &resp, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.key"), "{e}");
    }
}
