//! Enrollment (bootstrap) tokens: making them, deciding whether one may still be used, and the
//! operator's API and CLI for them (`delegate-cp tokens create|list|revoke`).
//!
//! Owns: token values (256 random bits, hex) and their SHA-256 (the only form stored), the
//! rules for pool, TTL, uses and name prefix, and the token views. Never stores, logs, audits or
//! lists a token value: it is shown once, in the answer to `create`.

use crate::api::{ApiError, ApiResult};
use crate::cli::{table, to_json, CliError};
use crate::client::ApiClient;
use crate::cp::ControlPlane;
use crate::store_enroll::{NewToken, TokenRow};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Defaults and bounds of a token.
pub const DEFAULT_TTL: &str = "1h";
pub const MIN_TTL: Duration = Duration::from_secs(60);
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const MAX_USES: u32 = 10_000;
/// Longest token value accepted at enrollment (ours are 64 hex digits).
pub const MAX_TOKEN_LEN: usize = 256;

/// Why a token cannot be used (now). `Unknown` is 401; the rest are 410 Gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Revoked { id: String },
    Expired { id: String, at_ms: i64 },
    UsedUp { id: String, uses: u32 },
}

impl TokenRefusal {
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            TokenRefusal::Unknown => axum::http::StatusCode::UNAUTHORIZED,
            _ => axum::http::StatusCode::GONE,
        }
    }

    /// The token's id, or "unknown": the audit target.
    pub fn target(&self) -> &str {
        match self {
            TokenRefusal::Unknown => "unknown",
            TokenRefusal::Revoked { id }
            | TokenRefusal::Expired { id, .. }
            | TokenRefusal::UsedUp { id, .. } => id,
        }
    }
}

impl std::fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenRefusal::Unknown => write!(
                f,
                "unknown enrollment token (check it was copied whole, or make one with `delegate-cp tokens create`)"
            ),
            TokenRefusal::Revoked { id } => write!(f, "enrollment token {id} was revoked"),
            TokenRefusal::Expired { id, at_ms } => write!(
                f,
                "enrollment token {id} expired at {}",
                crate::rfc3339(*at_ms)
            ),
            TokenRefusal::UsedUp { id, uses } => write!(
                f,
                "enrollment token {id} was already used ({uses} use{} allowed)",
                if *uses == 1 { "" } else { "s" }
            ),
        }
    }
}

/// May `t` be used for one more enrollment at `now_ms`?
pub fn check_token(t: &TokenRow, now_ms: i64) -> Result<(), TokenRefusal> {
    if t.revoked_at_ms.is_some() {
        return Err(TokenRefusal::Revoked { id: t.id.clone() });
    }
    if now_ms >= t.expires_at_ms {
        return Err(TokenRefusal::Expired {
            id: t.id.clone(),
            at_ms: t.expires_at_ms,
        });
    }
    if t.used >= t.uses {
        return Err(TokenRefusal::UsedUp {
            id: t.id.clone(),
            uses: t.uses,
        });
    }
    Ok(())
}

/// `active`, `used`, `expired` or `revoked`.
pub fn token_state(t: &TokenRow, now_ms: i64) -> &'static str {
    match check_token(t, now_ms) {
        Ok(()) => "active",
        Err(TokenRefusal::UsedUp { .. }) => "used",
        Err(TokenRefusal::Expired { .. }) => "expired",
        Err(TokenRefusal::Revoked { .. }) | Err(TokenRefusal::Unknown) => "revoked",
    }
}

/// Hex SHA-256 of a presented token value (surrounding whitespace ignored).
pub fn hash_token(value: &str) -> String {
    hex::encode(digest(&SHA256, value.trim().as_bytes()).as_ref())
}

/// A fresh token value: 32 random bytes, hex.
pub fn new_token_value() -> String {
    crate::init::new_token()
}

/// A fresh token id: 6 random bytes, hex (public: listed, audited, used to revoke).
pub fn new_token_id() -> String {
    let mut bytes = [0u8; 6];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut bytes[..]);
    hex::encode(bytes)
}

/// Agent names given at enrollment: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn valid_enroll_name(name: &str) -> bool {
    valid_lower_name(name, 63)
}

/// A pool an enrolled agent is bound to: what the agent accepts in the enrollment answer and
/// writes into its `agent.toml`. The same check as a task's pool ([`crate::task_ops::check_pool`]).
pub fn valid_pool(pool: &str) -> bool {
    crate::task_ops::check_pool(pool).is_ok()
}

/// A token's name prefix: like a name, at most 40 characters.
pub fn valid_name_prefix(prefix: &str) -> bool {
    valid_lower_name(prefix, 40)
}

fn valid_lower_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateTokenRequest {
    /// Default: the control plane's `default_pool`.
    #[serde(default)]
    pub pool: Option<String>,
    /// Humantime, default 1h.
    #[serde(default)]
    pub ttl: Option<String>,
    /// Default 1.
    #[serde(default)]
    pub uses: Option<u32>,
    /// Enrolled names must start with it; a name is made from it when the agent gives none.
    #[serde(default)]
    pub name_prefix: Option<String>,
}

/// A validated token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub pool: String,
    pub ttl: Duration,
    pub uses: u32,
    pub name_prefix: Option<String>,
}

impl CreateTokenRequest {
    /// Every problem at once, each naming its field.
    pub fn validate(&self, default_pool: &str) -> Result<TokenSpec, Vec<String>> {
        let mut errors = Vec::new();
        let pool = self
            .pool
            .clone()
            .unwrap_or_else(|| default_pool.to_string());
        if !valid_pool(&pool) {
            errors.push(format!(
                "pool: {pool:?} must be 1-256 characters from letters, digits, '.', '_', '-', starting with a letter or digit"
            ));
        }
        let ttl_text = self.ttl.as_deref().unwrap_or(DEFAULT_TTL);
        let ttl = match humantime::parse_duration(ttl_text.trim()) {
            Ok(d) if (MIN_TTL..=MAX_TTL).contains(&d) => d,
            Ok(_) => {
                errors.push(format!("ttl: {ttl_text:?} is outside 1m..=30d"));
                MIN_TTL
            }
            Err(e) => {
                errors.push(format!(
                    "ttl: {ttl_text:?} is not a duration like \"1h\" ({e})"
                ));
                MIN_TTL
            }
        };
        let uses = self.uses.unwrap_or(1);
        if uses == 0 || uses > MAX_USES {
            errors.push(format!("uses: must be 1..={MAX_USES}, got {uses}"));
        }
        if let Some(p) = &self.name_prefix {
            if !valid_name_prefix(p) {
                errors.push(format!(
                    "name_prefix: {p:?} must be 1-40 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"
                ));
            }
        }
        if errors.is_empty() {
            Ok(TokenSpec {
                pool,
                ttl,
                uses,
                name_prefix: self.name_prefix.clone(),
            })
        } else {
            Err(errors)
        }
    }
}

/// The answer to `POST /api/v1/tokens`: the only place the token value ever appears.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    /// The user API's base URL, where `delegate enroll` sends its request.
    pub url: String,
    /// Hex SHA-256 of the CA certificate (DER) the enrolling agent pins.
    pub ca_sha256: String,
    pub id: String,
    pub pool: String,
    pub uses: u32,
    pub name_prefix: Option<String>,
    pub expires_at: String,
}

impl std::fmt::Debug for TokenCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCreated")
            .field("token", &"<redacted>")
            .field("url", &self.url)
            .field("ca_sha256", &self.ca_sha256)
            .field("id", &self.id)
            .field("pool", &self.pool)
            .field("uses", &self.uses)
            .field("name_prefix", &self.name_prefix)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// `GET /api/v1/tokens` item: never the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub pool: String,
    pub name_prefix: Option<String>,
    pub uses: u32,
    pub used: u32,
    /// `active`, `used`, `expired` or `revoked`.
    pub state: String,
    pub created_at: String,
    pub expires_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

pub fn view(t: &TokenRow, now_ms: i64) -> TokenView {
    TokenView {
        id: t.id.clone(),
        pool: t.pool.clone(),
        name_prefix: t.name_prefix.clone(),
        uses: t.uses,
        used: t.used,
        state: token_state(t, now_ms).into(),
        created_at: crate::rfc3339(t.created_at_ms),
        expires_at: crate::rfc3339(t.expires_at_ms),
        last_used_at: t.last_used_at_ms.map(crate::rfc3339),
        revoked_at: t.revoked_at_ms.map(crate::rfc3339),
    }
}

/// The operator's token routes (behind the bearer token).
pub fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/api/v1/tokens", get(list).post(create))
        .route("/api/v1/tokens/{id}/revoke", post(revoke))
}

async fn create(
    State(cp): State<Arc<ControlPlane>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<TokenCreated>> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let req: CreateTokenRequest = crate::json_body::parse(&body, "invalid token request")?;
    let spec = req
        .validate(&cp.config.default_pool)
        .map_err(|errors| ApiError::bad_request(errors.join("; ")))?;
    let ca_sha256 = crate::enroll::ca_sha256(&cp.dd).map_err(ApiError::internal)?;
    let url = crate::enroll::api_url(&cp.dd, &cp.config);
    let now = crate::now_ms();
    let value = new_token_value();
    let id = new_token_id();
    let expires_at_ms = now.saturating_add(spec.ttl.as_millis() as i64);
    cp.store.insert_enroll_token(
        &NewToken {
            id: id.clone(),
            hash: hash_token(&value),
            pool: spec.pool.clone(),
            name_prefix: spec.name_prefix.clone(),
            uses: spec.uses,
            expires_at_ms,
        },
        now,
    )?;
    cp.audit(
        "api",
        "token.created",
        &id,
        &format!(
            "pool {} uses {} expires {}{}",
            spec.pool,
            spec.uses,
            crate::rfc3339(expires_at_ms),
            spec.name_prefix
                .as_deref()
                .map(|p| format!(" name prefix {p}"))
                .unwrap_or_default()
        ),
    );
    Ok(Json(TokenCreated {
        token: value,
        url,
        ca_sha256,
        id,
        pool: spec.pool,
        uses: spec.uses,
        name_prefix: spec.name_prefix,
        expires_at: crate::rfc3339(expires_at_ms),
    }))
}

async fn list(State(cp): State<Arc<ControlPlane>>) -> ApiResult<Json<Vec<TokenView>>> {
    let now = crate::now_ms();
    Ok(Json(
        cp.store
            .enroll_tokens()?
            .iter()
            .map(|t| view(t, now))
            .collect(),
    ))
}

async fn revoke(
    State(cp): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenView>> {
    let now = crate::now_ms();
    let before = cp
        .store
        .enroll_token(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no enrollment token {id}")))?;
    let after = cp
        .store
        .revoke_enroll_token(&id, now)?
        .ok_or_else(|| ApiError::not_found(format!("no enrollment token {id}")))?;
    if before.revoked_at_ms.is_none() {
        cp.audit(
            "api",
            "token.revoked",
            &id,
            &format!(
                "pool {}, {} of {} uses made",
                after.pool, after.used, after.uses
            ),
        );
    }
    Ok(Json(view(&after, now)))
}

// ---- CLI ----

/// `delegate-cp tokens create`.
pub async fn cli_create(
    client: &ApiClient,
    req: &CreateTokenRequest,
    json: bool,
) -> Result<String, CliError> {
    let t: TokenCreated = client.post_json("/api/v1/tokens", req).await?;
    if json {
        return Ok(to_json(&t));
    }
    let uses = if t.uses == 1 {
        "1 use".to_string()
    } else {
        format!("{} uses", t.uses)
    };
    Ok(format!(
        "enrollment token {} for pool {} ({uses}, expires {}):\n  {}\n\nenroll an agent with:\n  delegate enroll --url {} --token {} --ca-sha256 {} --out DIR\n",
        t.id, t.pool, t.expires_at, t.token, t.url, t.token, t.ca_sha256
    ))
}

/// `delegate-cp tokens list [--json]`.
pub async fn cli_list(client: &ApiClient, json: bool) -> Result<String, CliError> {
    let tokens: Vec<TokenView> = client.get_json("/api/v1/tokens").await?;
    if json {
        return Ok(to_json(&tokens));
    }
    let rows = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.pool.clone(),
                t.state.clone(),
                format!("{}/{}", t.used, t.uses),
                t.name_prefix.clone().unwrap_or_else(|| "-".into()),
                t.expires_at.clone(),
                t.last_used_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    Ok(table(
        &[
            "ID",
            "POOL",
            "STATE",
            "USED",
            "NAME PREFIX",
            "EXPIRES",
            "LAST USED",
        ],
        rows,
    ))
}

/// `delegate-cp tokens revoke ID [--json]`.
pub async fn cli_revoke(client: &ApiClient, id: &str, json: bool) -> Result<String, CliError> {
    let t: TokenView = client
        .post_json(
            &format!("/api/v1/tokens/{}/revoke", crate::cli::urlencode(id)),
            &serde_json::json!({}),
        )
        .await?;
    if json {
        return Ok(to_json(&t));
    }
    Ok(format!(
        "enrollment token {} revoked ({} of {} uses made)\n",
        t.id, t.used, t.uses
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uses: u32, used: u32, expires_at_ms: i64, revoked: Option<i64>) -> TokenRow {
        TokenRow {
            id: "t1".into(),
            pool: "p".into(),
            name_prefix: None,
            uses,
            used,
            created_at_ms: 0,
            expires_at_ms,
            revoked_at_ms: revoked,
            last_used_at_ms: None,
        }
    }

    #[test]
    fn token_checks() {
        assert_eq!(check_token(&row(1, 0, 100, None), 99), Ok(()));
        assert_eq!(
            check_token(&row(1, 0, 100, None), 100),
            Err(TokenRefusal::Expired {
                id: "t1".into(),
                at_ms: 100
            })
        );
        assert_eq!(
            check_token(&row(2, 2, 100, None), 1),
            Err(TokenRefusal::UsedUp {
                id: "t1".into(),
                uses: 2
            })
        );
        // Revoked wins over the other reasons; expired over used up.
        assert_eq!(
            check_token(&row(1, 1, 100, Some(5)), 200),
            Err(TokenRefusal::Revoked { id: "t1".into() })
        );
        assert!(matches!(
            check_token(&row(1, 1, 100, None), 200),
            Err(TokenRefusal::Expired { .. })
        ));
        assert_eq!(token_state(&row(3, 1, 100, None), 1), "active");
        assert_eq!(token_state(&row(1, 1, 100, None), 1), "used");
        assert_eq!(token_state(&row(1, 0, 100, None), 100), "expired");
        assert_eq!(token_state(&row(1, 0, 100, Some(1)), 1), "revoked");
    }

    #[test]
    fn refusal_statuses_and_messages() {
        assert_eq!(TokenRefusal::Unknown.status().as_u16(), 401);
        let used = TokenRefusal::UsedUp {
            id: "ab12".into(),
            uses: 1,
        };
        assert_eq!(used.status().as_u16(), 410);
        assert_eq!(
            used.to_string(),
            "enrollment token ab12 was already used (1 use allowed)"
        );
        let expired = TokenRefusal::Expired {
            id: "ab12".into(),
            at_ms: 0,
        };
        assert_eq!(expired.status().as_u16(), 410);
        assert!(expired.to_string().contains("expired at 1970-01-01"));
        assert_eq!(expired.target(), "ab12");
        assert_eq!(TokenRefusal::Unknown.target(), "unknown");
    }

    #[test]
    fn values_ids_and_hashes() {
        let v = new_token_value();
        assert_eq!(v.len(), 64);
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(v, new_token_value());
        assert_eq!(new_token_id().len(), 12);
        assert_eq!(hash_token(&v), hash_token(&format!(" {v}\n")));
        assert_ne!(hash_token(&v), hash_token(&new_token_value()));
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names_and_prefixes() {
        for ok in ["a", "runner-1", "0a.b_c-d", &"x".repeat(63)] {
            assert!(valid_enroll_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "a b",
            "a/b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(!valid_enroll_name(bad), "{bad}");
        }
        assert!(valid_name_prefix("pool-a-"));
        for ok in ["default", "AirGap_1", "eu-west.1"] {
            assert!(valid_pool(ok), "{ok}");
        }
        for bad in ["", "-x", "a b", "a/b", "x\n", &"p".repeat(257)] {
            assert!(!valid_pool(bad), "{bad:?}");
        }
        // One rule with tasks' pools.
        for p in ["default", "_x", ".x", "-x", "a_b", "é", &"p".repeat(256)] {
            assert_eq!(
                valid_pool(p),
                crate::task_ops::check_pool(p).is_ok(),
                "{p:?}"
            );
        }
        assert!(!valid_name_prefix(&"x".repeat(41)));
    }

    #[test]
    fn request_validation_reports_every_field() {
        let spec = CreateTokenRequest::default().validate("default").unwrap();
        assert_eq!(
            spec,
            TokenSpec {
                pool: "default".into(),
                ttl: Duration::from_secs(3600),
                uses: 1,
                name_prefix: None
            }
        );
        let spec = CreateTokenRequest {
            pool: Some("airgap".into()),
            ttl: Some("2h 30m".into()),
            uses: Some(5),
            name_prefix: Some("gpu-".into()),
        }
        .validate("default")
        .unwrap();
        assert_eq!(spec.ttl, Duration::from_secs(9000));
        assert_eq!(spec.name_prefix.as_deref(), Some("gpu-"));
        let errors = CreateTokenRequest {
            pool: Some(String::new()),
            ttl: Some("forever".into()),
            uses: Some(0),
            name_prefix: Some("Bad/".into()),
        }
        .validate("default")
        .unwrap_err();
        let all = errors.join("\n");
        for field in ["pool:", "ttl:", "uses:", "name_prefix:"] {
            assert!(all.contains(field), "{all}");
        }
        let errors = CreateTokenRequest {
            ttl: Some("40d".into()),
            uses: Some(MAX_USES + 1),
            ..Default::default()
        }
        .validate("default")
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
