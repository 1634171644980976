//! Revoking agents (`delegate-cp agents revoke NAME`) and refusing them afterwards.
//!
//! Where a revoked agent is refused: right after the TLS handshake and the WebSocket upgrade,
//! before its Hello is read, with `error{code: unauthorized, message: "agent NAME is revoked"}`
//! and a close (audited `agent.refused`, detail starting with `revoked`). The TLS handshake itself
//! still completes: in TLS 1.3 the client would not see a handshake-time refusal before its first
//! read anyway, and this way the agent gets a message it can show. The Hello is checked again
//! (and once more after the connection is registered, so a revocation racing a connection
//! cannot slip between check and registration).
//!
//! What is refused, as pure decisions ([`check_certificate`], [`check_hello`]):
//! - a revoked name, whatever certificate it presents;
//! - for an enrolled name, a certificate not issued to it under its current enrollment (the
//!   certificates of a revoked-then-re-enrolled name, or an `init` bundle of that name);
//! - for an enrolled name, a Hello naming another pool than the token bound it to.
//!
//! Names never enrolled nor revoked (`init` bundles) are admitted as before, on their CA-signed
//! certificate alone. Storage errors refuse (fail closed).
//!
//! Owns: the revocation record, closing the live connection, the refusal checks and the
//! `revoked` state in agent listings. Never leaves a revoked agent's live connection open, and
//! never holds the hub lock across an `.await`.

use crate::api::{AgentView, ApiError, ApiResult};
use crate::cli::{to_json, CliError};
use crate::client::ApiClient;
use crate::cp::{ControlPlane, Counters};
use crate::hub::Outbound;
use crate::store::StoreError;
use crate::store_enroll::{CertRow, IdentityRow};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use delegate_protocol::{encode_text, ErrorCode, ErrorMsg, Message};
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Revoked {
        name: String,
    },
    NotIssued {
        name: String,
        serial: String,
    },
    WrongPool {
        name: String,
        enrolled: String,
        claimed: String,
    },
    /// The revocation state could not be read: refuse rather than guess.
    Storage,
}

impl Refusal {
    /// First word of the audit detail.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Revoked { .. } => "revoked",
            Refusal::NotIssued { .. } => "certificate not issued to this enrollment",
            Refusal::WrongPool { .. } => "wrong pool",
            Refusal::Storage => "storage error",
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::Storage => ErrorCode::Internal,
            _ => ErrorCode::Unauthorized,
        }
    }

    /// The error frame sent before closing.
    pub fn message(&self) -> Message {
        Message::Error(ErrorMsg {
            code: self.code(),
            message: self.to_string(),
            task_id: None,
        })
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Revoked { name } => write!(f, "agent {name} is revoked"),
            Refusal::NotIssued { name, serial } => write!(
                f,
                "certificate {serial} was not issued to agent {name} under its current enrollment (a certificate from before it was revoked and enrolled again?)"
            ),
            Refusal::WrongPool {
                name,
                enrolled,
                claimed,
            } => write!(
                f,
                "agent {name} is enrolled in pool {enrolled:?}, its hello names pool {claimed:?}"
            ),
            Refusal::Storage => write!(f, "control plane storage error; try again"),
        }
    }
}

/// Is a verified certificate (CN `name`, `serial`) admitted? `cert` is what was issued under
/// that serial, if anything.
pub fn check_certificate(
    identity: Option<&IdentityRow>,
    cert: Option<&CertRow>,
    name: &str,
    serial: &str,
) -> Result<(), Refusal> {
    let Some(identity) = identity else {
        return Ok(());
    };
    if identity.is_revoked() {
        return Err(Refusal::Revoked { name: name.into() });
    }
    match &identity.enrollment {
        None => Ok(()),
        Some(current) => match cert {
            Some(c) if c.name == name && c.enrollment.as_ref() == Some(current) => Ok(()),
            _ => Err(Refusal::NotIssued {
                name: name.into(),
                serial: serial.into(),
            }),
        },
    }
}

/// Is a Hello claiming `pool` from the identity `name` admitted?
pub fn check_hello(identity: Option<&IdentityRow>, name: &str, pool: &str) -> Result<(), Refusal> {
    let Some(identity) = identity else {
        return Ok(());
    };
    if identity.is_revoked() {
        return Err(Refusal::Revoked { name: name.into() });
    }
    match &identity.pool {
        Some(enrolled) if enrolled != pool => Err(Refusal::WrongPool {
            name: name.into(),
            enrolled: enrolled.clone(),
            claimed: pool.into(),
        }),
        _ => Ok(()),
    }
}

fn storage(name: &str, e: StoreError) -> Refusal {
    tracing::error!(agent = name, error = %e, "cannot read the agent's revocation state");
    Refusal::Storage
}

/// [`check_certificate`] against the store.
pub fn admit_certificate(cp: &ControlPlane, name: &str, serial: &str) -> Result<(), Refusal> {
    let identity = cp
        .store
        .agent_identity(name)
        .map_err(|e| storage(name, e))?;
    let cert = match &identity {
        Some(i) if !i.is_revoked() && i.enrollment.is_some() => {
            cp.store.agent_cert(serial).map_err(|e| storage(name, e))?
        }
        _ => None,
    };
    check_certificate(identity.as_ref(), cert.as_ref(), name, serial)
}

/// [`check_hello`] against the store.
pub fn admit_hello(cp: &ControlPlane, name: &str, pool: &str) -> Result<(), Refusal> {
    let identity = cp
        .store
        .agent_identity(name)
        .map_err(|e| storage(name, e))?;
    check_hello(identity.as_ref(), name, pool)
}

/// Record and log a refused connection (counted with the refused handshakes).
pub fn audit_refusal(cp: &ControlPlane, name: &str, peer: &str, r: &Refusal) {
    Counters::bump(&cp.counters.refused_handshakes);
    tracing::warn!(agent = name, peer, "agent connection refused: {r}");
    cp.audit(
        name,
        "agent.refused",
        name,
        &format!("{}: {r} (peer {peer})", r.reason()),
    );
}

/// Refuse a connection that passed TLS and the WebSocket upgrade: audit, tell the agent why,
/// close.
pub async fn refuse_connection<S>(
    cp: &ControlPlane,
    name: &str,
    peer: &str,
    mut ws: WebSocketStream<S>,
    r: Refusal,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    audit_refusal(cp, name, peer, &r);
    let send = async {
        ws.send(WsMessage::text(encode_text(&r.message()))).await?;
        ws.close(None).await
    };
    let _ = tokio::time::timeout(crate::agent_link::HANDSHAKE_TIMEOUT, send).await;
}

/// Errors revoking. Not retryable except `Store` when the database is busy.
#[derive(Debug, Error)]
pub enum RevokeError {
    #[error("no agent {0} (never enrolled, connected or bundled)")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeView {
    pub name: String,
    /// Always `revoked`.
    pub state: String,
    pub already_revoked: bool,
    /// The peer whose live connection was closed, if it was connected.
    pub disconnected: Option<String>,
}

/// Revoke `name`: record it, then close its live connection at once (after an `unauthorized`
/// error frame). Audited `agent.revoked`.
pub fn revoke_agent(cp: &ControlPlane, name: &str, who: &str) -> Result<RevokeView, RevokeError> {
    if crate::pki::check_agent_name(name).is_err() {
        return Err(RevokeError::NotFound(name.chars().take(80).collect()));
    }
    let known = cp.store.agent_identity(name)?.is_some()
        || cp.store.agent_seen(name)?
        || cp.dd.agent_dir(name).exists();
    if !known {
        return Err(RevokeError::NotFound(name.into()));
    }
    let before = cp
        .store
        .revoke_identity(name, &format!("revoked by {who}"), crate::now_ms())?;
    let already_revoked = before.as_ref().is_some_and(IdentityRow::is_revoked);
    // Recorded first: a connection registering from now on is refused by its own re-check; one
    // registered before is found here.
    let refusal = Refusal::Revoked { name: name.into() };
    let live = {
        let mut hub = cp.hub();
        hub.agents.get_mut(name).map(|c| {
            let _ = c.tx.send(Outbound::Text(encode_text(&refusal.message())));
            (c.peer.clone(), c.close.take())
        })
    };
    let disconnected = live.map(|(peer, close)| {
        if let Some(close) = close {
            let _ = close.send(format!("revoked by {who}"));
        }
        peer
    });
    if !already_revoked || disconnected.is_some() {
        cp.audit(
            who,
            "agent.revoked",
            name,
            &match &disconnected {
                Some(peer) => format!("live connection from {peer} closed"),
                None => "not connected".into(),
            },
        );
    }
    tracing::info!(agent = name, disconnected = ?disconnected, "agent revoked");
    Ok(RevokeView {
        name: name.into(),
        state: "revoked".into(),
        already_revoked,
        disconnected,
    })
}

/// Agent listings with what enrollment knows: revoked agents show state `revoked`; enrolled
/// agents that never connected show as `disconnected` (pool from their token).
pub fn overlay_identities(views: &mut Vec<AgentView>, identities: &[IdentityRow]) {
    for i in identities {
        match views.iter_mut().find(|v| v.name == i.name) {
            Some(v) => {
                if i.is_revoked() {
                    v.state = "revoked".into();
                }
            }
            None => views.push(AgentView {
                name: i.name.clone(),
                state: if i.is_revoked() {
                    "revoked"
                } else {
                    "disconnected"
                }
                .into(),
                version: String::new(),
                pool: i.pool.clone().unwrap_or_default(),
                labels: BTreeMap::new(),
                last_heartbeat: None,
            }),
        }
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
}

/// The operator's revocation route (behind the bearer token).
pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new().route("/api/v1/agents/{name}/revoke", post(revoke_handler))
}

async fn revoke_handler(
    State(cp): State<Arc<ControlPlane>>,
    Path(name): Path<String>,
) -> ApiResult<Json<RevokeView>> {
    match revoke_agent(&cp, &name, "api") {
        Ok(v) => Ok(Json(v)),
        Err(RevokeError::NotFound(n)) => Err(ApiError::not_found(format!(
            "no agent {n} (never enrolled, connected or bundled)"
        ))),
        Err(RevokeError::Store(e)) => Err(e.into()),
    }
}

/// `delegate-cp agents revoke NAME [--json]`.
pub async fn cli_revoke(client: &ApiClient, name: &str, json: bool) -> Result<String, CliError> {
    let v: RevokeView = client
        .post_json(
            &format!("/api/v1/agents/{}/revoke", crate::cli::urlencode(name)),
            &serde_json::json!({}),
        )
        .await?;
    if json {
        return Ok(to_json(&v));
    }
    let mut out = if v.already_revoked {
        format!("agent {} was already revoked", v.name)
    } else {
        format!("agent {} revoked", v.name)
    };
    match &v.disconnected {
        Some(peer) => out.push_str(&format!("; its connection from {peer} was closed\n")),
        None => out.push_str(" (it was not connected)\n"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(enrollment: Option<&str>, pool: Option<&str>, revoked: bool) -> IdentityRow {
        IdentityRow {
            name: "a1".into(),
            pool: pool.map(Into::into),
            enrollment: enrollment.map(Into::into),
            token_id: None,
            enrolled_at_ms: None,
            revoked_at_ms: revoked.then_some(5),
            revoked_reason: None,
        }
    }

    fn cert(name: &str, enrollment: Option<&str>) -> CertRow {
        CertRow {
            serial: "s1".into(),
            name: name.into(),
            enrollment: enrollment.map(Into::into),
            kind: "enroll".into(),
            issued_at_ms: 0,
            not_after_ms: 1,
        }
    }

    #[test]
    fn certificates() {
        // Not managed by enrollment: the CA signature is enough.
        assert_eq!(check_certificate(None, None, "a1", "s1"), Ok(()));
        // Revoked: refused whatever the certificate.
        let revoked = identity(Some("e1"), Some("p"), true);
        let r = check_certificate(Some(&revoked), Some(&cert("a1", Some("e1"))), "a1", "s1");
        assert_eq!(r, Err(Refusal::Revoked { name: "a1".into() }));
        assert_eq!(r.unwrap_err().to_string(), "agent a1 is revoked");
        let bundle_revoked = identity(None, None, true);
        assert!(check_certificate(Some(&bundle_revoked), None, "a1", "s1").is_err());
        // Enrolled: only certificates of the current enrollment.
        let enrolled = identity(Some("e2"), Some("p"), false);
        assert_eq!(
            check_certificate(Some(&enrolled), Some(&cert("a1", Some("e2"))), "a1", "s1"),
            Ok(())
        );
        for c in [
            None,
            Some(cert("a1", Some("e1"))),
            Some(cert("b1", Some("e2"))),
        ] {
            assert!(matches!(
                check_certificate(Some(&enrolled), c.as_ref(), "a1", "s1"),
                Err(Refusal::NotIssued { .. })
            ));
        }
    }

    #[test]
    fn hellos() {
        assert_eq!(check_hello(None, "a1", "any"), Ok(()));
        let enrolled = identity(Some("e1"), Some("pool-a"), false);
        assert_eq!(check_hello(Some(&enrolled), "a1", "pool-a"), Ok(()));
        let r = check_hello(Some(&enrolled), "a1", "pool-b").unwrap_err();
        assert_eq!(r.reason(), "wrong pool");
        assert_eq!(r.code(), ErrorCode::Unauthorized);
        assert!(check_hello(Some(&identity(None, None, true)), "a1", "p").is_err());
        assert_eq!(Refusal::Storage.code(), ErrorCode::Internal);
    }

    #[test]
    fn listing_overlay() {
        let view = |name: &str, state: &str| AgentView {
            name: name.into(),
            state: state.into(),
            version: "1".into(),
            pool: "default".into(),
            labels: BTreeMap::new(),
            last_heartbeat: None,
        };
        let mut views = vec![view("b", "disconnected"), view("c", "connected")];
        let mut ids = vec![
            identity(Some("e"), Some("pool-a"), false),
            identity(None, None, true),
            identity(Some("e"), Some("pool-x"), true),
        ];
        ids[0].name = "a".into();
        ids[1].name = "b".into();
        ids[2].name = "d".into();
        overlay_identities(&mut views, &ids);
        let got: Vec<(&str, &str, &str)> = views
            .iter()
            .map(|v| (v.name.as_str(), v.state.as_str(), v.pool.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "disconnected", "pool-a"),
                ("b", "revoked", "default"),
                ("c", "connected", "default"),
                ("d", "revoked", "pool-x"),
            ]
        );
    }
}
