//! Enrollment and renewal: an agent with a bootstrap token and a CSR gets a short-lived client
//! certificate (`POST /api/v1/enroll`, no bearer token: the bootstrap token is the credential),
//! and renews it over its live mTLS link (`renew_request` / `renew_response`).
//!
//! Owns: the enrollment endpoint and its refusals (401 unknown token, 410 used/expired/revoked
//! token, 400 bad request, 403 name outside the token's prefix, 409 name taken), choosing the
//! agent's name, issuing certificates from CSRs (CN = the agent's name whatever the CSR says,
//! client-auth EKU, `agent_cert_ttl`), and the public URLs and CA hash an enrolling agent needs.
//! Never sees or stores an agent's private key, never logs or audits a token value, and never
//! issues a certificate for a revoked name or for an identity other than the link's own.

use crate::api::{ApiError, ApiResult};
use crate::config::{CpConfig, DataDir};
use crate::cp::ControlPlane;
use crate::pki::{Ca, IssuedForKey, PkiError};
use crate::store::StoreError;
use crate::store_enroll::{EnrollConflict, NewEnrollment};
use crate::tasks::{Fault, Reply};
use crate::tokens::{self, TokenRefusal};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use delegate_protocol::{ErrorCode, Message, RenewResponse};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use thiserror::Error;

/// The enrollment path on the user API listener.
pub const ENROLL_PATH: &str = "/api/v1/enroll";
/// Largest enrollment request body (a CSR is well under 4 KiB).
pub const MAX_ENROLL_BODY: usize = 64 * 1024;
/// Issued certificates start this much before now, for clock skew between hosts.
pub const BACKDATE_SECS: i64 = 300;

/// Renewals closer together than this are refused: an agent asks once per certificate life and
/// retries no sooner than 30 s, so only a misbehaving peer hits it (and cannot flood the audit
/// trail with signatures).
pub const MIN_RENEWAL_INTERVAL_MS: i64 = 10_000;

/// How long an agent whose last renewal was at `last_ms` must still wait at `now_ms` (None: it
/// may renew now).
pub fn renewal_wait_ms(last_ms: Option<i64>, now_ms: i64) -> Option<i64> {
    let next = last_ms?.saturating_add(MIN_RENEWAL_INTERVAL_MS);
    (now_ms < next).then(|| next - now_ms)
}

/// Errors issuing a certificate. `Store` may be retryable (database busy); the others need the
/// operator (CA files) or the requester (bad CSR).
#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("cannot read the agent CA ({path}): {reason}")]
    CaFiles { path: String, reason: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `POST /api/v1/enroll` body. `Debug` redacts the token.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    pub csr_pem: String,
    /// The agent's name; default the CSR's CN, then (with a token name prefix) a generated one.
    #[serde(default)]
    pub name: Option<String>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &"<redacted>")
            .field("csr_pem", &self.csr_pem)
            .field("name", &self.name)
            .finish()
    }
}

/// `POST /api/v1/enroll` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub cert_pem: String,
    pub ca_pem: String,
    /// `wss://host:port/v1/agent`, for the agent's `control_plane.url`.
    pub agent_url: String,
    pub pool: String,
    pub name: String,
}

/// Why a requested name is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameRefusal {
    Missing,
    Invalid(String),
    OutsidePrefix { name: String, prefix: String },
}

impl NameRefusal {
    pub fn status(&self) -> StatusCode {
        match self {
            NameRefusal::OutsidePrefix { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl std::fmt::Display for NameRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameRefusal::Missing => write!(
                f,
                "no agent name: pass one (delegate enroll --name NAME) or put it in the CSR's common name"
            ),
            NameRefusal::Invalid(n) => write!(
                f,
                "agent name {n:?} is not valid: use 1-63 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"
            ),
            NameRefusal::OutsidePrefix { name, prefix } => write!(
                f,
                "agent name {name:?} does not start with {prefix:?}, the only names this token enrolls"
            ),
        }
    }
}

fn given(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// The agent's name: the one asked for, else the CSR's CN, else (when the token has a prefix)
/// the prefix and `suffix`; in lower case. It must be a valid name and start with the token's
/// prefix.
pub fn choose_name(
    requested: Option<&str>,
    csr_cn: Option<&str>,
    prefix: Option<&str>,
    suffix: &str,
) -> Result<String, NameRefusal> {
    let name = match (given(requested), given(csr_cn), prefix) {
        (Some(n), _, _) | (None, Some(n), _) => n.to_string(),
        (None, None, Some(p)) if p.ends_with(['-', '.', '_']) => format!("{p}{suffix}"),
        (None, None, Some(p)) => format!("{p}-{suffix}"),
        (None, None, None) => return Err(NameRefusal::Missing),
    };
    // Host names come in any case; agent names are lower case (the answer carries the result).
    let lower = name.to_ascii_lowercase();
    if !tokens::valid_enroll_name(&lower) {
        // Bounded: the message goes to the requester and the audit trail.
        let shown: String = name.chars().take(80).collect();
        return Err(NameRefusal::Invalid(shown));
    }
    let name = lower;
    if let Some(p) = prefix {
        if !name.starts_with(p) {
            return Err(NameRefusal::OutsidePrefix {
                name,
                prefix: p.to_string(),
            });
        }
    }
    Ok(name)
}

/// The agent CA from the data directory.
pub fn load_ca(dd: &DataDir) -> Result<Ca, EnrollError> {
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| EnrollError::CaFiles {
            path: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    Ok(Ca::load(&read(dd.ca_cert())?, &read(dd.ca_key())?)?)
}

/// Issue a client certificate for `name` to the key of `csr_pem`, valid `ttl` from now.
pub fn issue(
    dd: &DataDir,
    config: &CpConfig,
    name: &str,
    csr_pem: &str,
    now_ms: i64,
) -> Result<IssuedForKey, EnrollError> {
    let ca = load_ca(dd)?;
    let now = now_ms.div_euclid(1000);
    let ttl = config.agent_cert_ttl().as_secs() as i64;
    Ok(ca.issue_agent_from_csr(name, csr_pem, now - BACKDATE_SECS, now + ttl)?)
}

/// Hex SHA-256 of the CA certificate's DER: what `delegate enroll --ca-sha256` pins.
pub fn ca_sha256(dd: &DataDir) -> Result<String, crate::tls::TlsError> {
    let certs = crate::tls::load_certs(&dd.ca_cert())?;
    // load_certs never returns an empty list.
    let first = certs.first().map(|c| c.as_ref()).unwrap_or_default();
    Ok(hex::encode(
        ring::digest::digest(&ring::digest::SHA256, first).as_ref(),
    ))
}

/// The host agents reach the control plane at: the first name or address of the server
/// certificate other than the built-in localhost/127.0.0.1 (the first `init --san`), else
/// 127.0.0.1 — the same choice `init` makes for its agent bundles.
pub fn public_host(dd: &DataDir) -> String {
    let sans = std::fs::read(dd.server_cert())
        .ok()
        .and_then(|pem| {
            rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
                .ok()
                .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        })
        .map(|der| server_sans(&der))
        .unwrap_or_default();
    pick_host(&sans)
}

fn server_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// First SAN that is neither built in nor a wildcard; 127.0.0.1 when there is none.
pub fn pick_host(sans: &[String]) -> String {
    sans.iter()
        .find(|s| !matches!(s.as_str(), "localhost" | "127.0.0.1" | "::1") && !s.starts_with("*."))
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".into())
}

fn url_host(host: &str) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The port actually bound (from `listen.json`, written by `serve`), else the configured one.
fn bound_port(dd: &DataDir, key: &str, configured: SocketAddr) -> u16 {
    std::fs::read_to_string(dd.listen_file())
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get(key)?.as_str()?.parse::<SocketAddr>().ok())
        .map(|a| a.port())
        .unwrap_or(configured.port())
}

/// `https://host:port` of the user API: where agents enroll.
pub fn api_url(dd: &DataDir, config: &CpConfig) -> String {
    format!(
        "https://{}:{}",
        url_host(&public_host(dd)),
        bound_port(dd, "api", config.api_addr())
    )
}

/// `wss://host:port/v1/agent`: where enrolled agents connect.
pub fn agent_url(dd: &DataDir, config: &CpConfig) -> String {
    format!(
        "wss://{}:{}{}",
        url_host(&public_host(dd)),
        bound_port(dd, "agent", config.agent_addr()),
        crate::agent_link::AGENT_PATH
    )
}

/// Routes for the operator (behind the bearer token): tokens and agent revocation.
pub fn routes() -> Router<Arc<ControlPlane>> {
    crate::tokens::routes().merge(crate::revoke::routes())
}

/// Routes without the bearer token: enrollment only.
pub fn public_routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(ENROLL_PATH, post(enroll_handler))
        .layer(DefaultBodyLimit::max(MAX_ENROLL_BODY))
}

async fn enroll_handler(
    State(cp): State<Arc<ControlPlane>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<EnrollResponse>> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    // The body carries the enrollment token: errors never quote a value.
    let req: EnrollRequest =
        crate::json_body::parse(&body, "expected JSON {\"token\", \"csr_pem\", \"name\"}")?;
    // Signing and SQLite are short but blocking.
    let cp2 = cp.clone();
    tokio::task::spawn_blocking(move || enroll(&cp2, &req, crate::now_ms()))
        .await
        .map_err(ApiError::internal)?
        .map(Json)
}

/// Refuse an enrollment: audited as `token.refused` with the reason, answered with `status`.
fn refuse(cp: &ControlPlane, target: &str, status: StatusCode, reason: String) -> ApiError {
    tracing::warn!(
        token = target,
        status = status.as_u16(),
        "enrollment refused: {reason}"
    );
    cp.audit("controlplane", "token.refused", target, &reason);
    ApiError::new(status, reason)
}

/// The enrollment itself, without HTTP: check the token, choose the name, issue, commit.
pub fn enroll(cp: &ControlPlane, req: &EnrollRequest, now_ms: i64) -> ApiResult<EnrollResponse> {
    let token = req.token.trim();
    let row = if token.is_empty() || token.len() > tokens::MAX_TOKEN_LEN {
        None
    } else {
        cp.store.enroll_token_by_hash(&tokens::hash_token(token))?
    };
    let Some(row) = row else {
        let r = TokenRefusal::Unknown;
        return Err(refuse(cp, r.target(), r.status(), r.to_string()));
    };
    if let Err(r) = tokens::check_token(&row, now_ms) {
        return Err(refuse(cp, r.target(), r.status(), r.to_string()));
    }
    let bad = |reason: String| refuse(cp, &row.id, StatusCode::BAD_REQUEST, reason);
    if req.csr_pem.len() > delegate_protocol::limits::MAX_TEXT {
        return Err(bad(format!(
            "csr_pem: {} bytes, limit {}",
            req.csr_pem.len(),
            delegate_protocol::limits::MAX_TEXT
        )));
    }
    let cn = crate::pki::csr_common_name(&req.csr_pem).map_err(|e| bad(e.to_string()))?;
    let suffix = &tokens::new_token_id()[..8];
    let name = choose_name(
        req.name.as_deref(),
        cn.as_deref(),
        row.name_prefix.as_deref(),
        suffix,
    )
    .map_err(|r| refuse(cp, &row.id, r.status(), r.to_string()))?;
    let name_taken = |name: &str| {
        refuse(
            cp,
            &row.id,
            StatusCode::CONFLICT,
            format!(
                "agent {name} already exists and is not revoked; pick another name, or revoke it first (delegate-cp agents revoke {name})"
            ),
        )
    };
    // A clear answer before signing; the commit below re-checks under its transaction.
    let bundle = cp.dd.agent_dir(&name).exists();
    let identity = cp.store.agent_identity(&name)?;
    let revoked = identity.as_ref().is_some_and(|i| i.is_revoked());
    if !revoked && (identity.is_some() || bundle || cp.store.agent_seen(&name)?) {
        return Err(name_taken(&name));
    }
    let issued = match issue(&cp.dd, &cp.config, &name, &req.csr_pem, now_ms) {
        Ok(i) => i,
        Err(EnrollError::Pki(e)) => return Err(bad(e.to_string())),
        Err(e) => return Err(ApiError::internal(e)),
    };
    let enrollment = uuid::Uuid::new_v4().to_string();
    let not_after_ms = issued.not_after.saturating_mul(1000);
    let committed = cp.store.commit_enrollment(
        &NewEnrollment {
            token_id: &row.id,
            name: &name,
            enrollment: &enrollment,
            serial: &issued.serial,
            not_after_ms,
        },
        bundle,
        now_ms,
    )?;
    let token_after = match committed {
        Ok(t) => t,
        Err(EnrollConflict::Token(r)) => {
            return Err(refuse(cp, r.target(), r.status(), r.to_string()))
        }
        Err(EnrollConflict::NameTaken(n)) => return Err(name_taken(&n)),
    };
    cp.audit(
        "controlplane",
        "token.used",
        &row.id,
        &format!(
            "enrolled agent {name} in pool {}; {} of {} uses made",
            row.pool, token_after.used, token_after.uses
        ),
    );
    cp.audit(
        "controlplane",
        "agent.enrolled",
        &name,
        &format!(
            "pool {} token {} certificate serial {} valid until {}",
            row.pool,
            row.id,
            issued.serial,
            crate::rfc3339(not_after_ms)
        ),
    );
    tracing::info!(agent = %name, pool = %row.pool, token = %row.id, "agent enrolled");
    let ca_pem = std::fs::read_to_string(cp.dd.ca_cert()).map_err(ApiError::internal)?;
    Ok(EnrollResponse {
        cert_pem: issued.cert_pem,
        ca_pem,
        agent_url: agent_url(&cp.dd, &cp.config),
        pool: row.pool,
        name,
    })
}

/// `renew_request` on a live link: a new certificate for the connection's identity (`agent`,
/// from its verified certificate), whatever the CSR's subject says.
pub fn renew(cp: &ControlPlane, agent: &str, csr_pem: &str) -> Result<Reply, Fault> {
    let fault = |code, message: String| Fault {
        code,
        message,
        task_id: None,
    };
    let refused = |code, reason: String| {
        tracing::warn!(agent, "renewal refused: {reason}");
        cp.audit(agent, "agent.renew_refused", agent, &reason);
        fault(code, reason)
    };
    match cp.store.agent_identity(agent) {
        Ok(Some(i)) if i.is_revoked() => {
            return Err(refused(
                ErrorCode::Unauthorized,
                format!("agent {agent} is revoked"),
            ))
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(agent, error = %e, "renewal: cannot read the agent's identity");
            return Err(fault(
                ErrorCode::Internal,
                "control plane storage error".into(),
            ));
        }
    }
    let now_ms = crate::now_ms();
    match cp.store.last_renewal_ms(agent) {
        Ok(last) => {
            if let Some(wait) = renewal_wait_ms(last, now_ms) {
                return Err(refused(
                    ErrorCode::Unauthorized,
                    format!(
                        "agent {agent} renewed its certificate moments ago; ask again in {} s",
                        (wait + 999) / 1000
                    ),
                ));
            }
        }
        Err(e) => {
            tracing::error!(agent, error = %e, "renewal: cannot read the last renewal");
            return Err(fault(
                ErrorCode::Internal,
                "control plane storage error".into(),
            ));
        }
    }
    let issued = match issue(&cp.dd, &cp.config, agent, csr_pem, now_ms) {
        Ok(i) => i,
        Err(EnrollError::Pki(e)) => {
            return Err(refused(
                ErrorCode::InvalidField,
                format!("renew_request.csr_pem: {e}"),
            ))
        }
        Err(e) => {
            tracing::error!(agent, error = %e, "renewal failed");
            return Err(fault(
                ErrorCode::Internal,
                "control plane cannot issue certificates right now".into(),
            ));
        }
    };
    let not_after_ms = issued.not_after.saturating_mul(1000);
    if let Err(e) = cp
        .store
        .record_renewal(agent, &issued.serial, not_after_ms, now_ms)
    {
        tracing::error!(agent, error = %e, "renewal: cannot record the certificate");
        return Err(fault(
            ErrorCode::Internal,
            "control plane storage error".into(),
        ));
    }
    cp.audit(
        agent,
        "agent.renewed",
        agent,
        &format!(
            "certificate serial {} valid until {}",
            issued.serial,
            crate::rfc3339(not_after_ms)
        ),
    );
    tracing::info!(agent, serial = %issued.serial, "client certificate renewed");
    Ok(Reply {
        send: vec![Message::RenewResponse(RenewResponse {
            cert_pem: issued.cert_pem,
            ca_pem: None,
        })],
        ..Reply::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_debug_redacts_the_token() {
        let r = EnrollRequest {
            token: "dlg-enroll-secret-0123456789".into(),
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            name: Some("web-1".into()),
        };
        let d = format!("{r:?}");
        assert!(!d.contains("dlg-enroll-secret-0123456789"), "{d}");
        assert!(d.contains("<redacted>") && d.contains("web-1"), "{d}");
    }

    #[test]
    fn names_from_request_csr_or_prefix() {
        assert_eq!(
            choose_name(Some("web-1"), Some("cn-1"), None, "x").unwrap(),
            "web-1"
        );
        assert_eq!(
            choose_name(Some("  "), Some("cn-1"), None, "x").unwrap(),
            "cn-1"
        );
        assert_eq!(
            choose_name(None, None, Some("gpu-"), "1a2b").unwrap(),
            "gpu-1a2b"
        );
        assert_eq!(
            choose_name(None, None, Some("gpu"), "1a2b").unwrap(),
            "gpu-1a2b"
        );
        assert_eq!(
            choose_name(None, None, None, "x"),
            Err(NameRefusal::Missing)
        );
        assert_eq!(
            choose_name(Some("Web/1"), None, None, "x"),
            Err(NameRefusal::Invalid("Web/1".into()))
        );
        assert_eq!(choose_name(Some("VM-1"), None, None, "x").unwrap(), "vm-1");
        let r = choose_name(Some("web-1"), None, Some("gpu-"), "x").unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.to_string().contains("gpu-"), "{r}");
        assert_eq!(
            choose_name(None, Some("gpu-7"), Some("gpu-"), "x").unwrap(),
            "gpu-7"
        );
        let long = "a".repeat(500);
        match choose_name(Some(&long), None, None, "x") {
            Err(NameRefusal::Invalid(shown)) => assert_eq!(shown.len(), 80),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn renewals_are_spaced() {
        assert_eq!(renewal_wait_ms(None, 5), None);
        assert_eq!(renewal_wait_ms(Some(1_000), 1_000), Some(10_000));
        assert_eq!(renewal_wait_ms(Some(1_000), 10_999), Some(1));
        assert_eq!(renewal_wait_ms(Some(1_000), 11_000), None);
        // A clock that went backwards waits at most the interval plus the step back.
        assert_eq!(renewal_wait_ms(Some(5_000), 4_000), Some(11_000));
    }

    #[test]
    fn host_choice() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(pick_host(&s(&["localhost", "127.0.0.1"])), "127.0.0.1");
        assert_eq!(
            pick_host(&s(&[
                "localhost",
                "127.0.0.1",
                "*.corp",
                "cp.internal",
                "10.0.0.5"
            ])),
            "cp.internal"
        );
        assert_eq!(url_host("fd00::5"), "[fd00::5]");
        assert_eq!(url_host("cp.internal"), "cp.internal");
    }

    #[test]
    fn urls_and_ca_hash_from_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("cp"));
        crate::init::init(
            &dd,
            &crate::init::InitOptions {
                sans: vec!["cp.internal".into(), "10.0.0.5".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let cfg = CpConfig::default();
        assert_eq!(api_url(&dd, &cfg), "https://cp.internal:8444");
        assert_eq!(agent_url(&dd, &cfg), "wss://cp.internal:8443/v1/agent");
        // The bound ports win once `serve` has written them.
        std::fs::write(
            dd.listen_file(),
            r#"{"agent":"127.0.0.1:40001","api":"127.0.0.1:40002"}"#,
        )
        .unwrap();
        assert_eq!(api_url(&dd, &cfg), "https://cp.internal:40002");
        assert_eq!(agent_url(&dd, &cfg), "wss://cp.internal:40001/v1/agent");
        let hash = ca_sha256(&dd).unwrap();
        let der = crate::tls::load_certs(&dd.ca_cert()).unwrap();
        assert_eq!(
            hash,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, der[0].as_ref()).as_ref())
        );
        assert_eq!(hash.len(), 64);
    }
}
