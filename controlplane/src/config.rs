//! The control plane's own configuration (`DIR/controlplane.toml`) and the layout of its data
//! directory.
//!
//! Owns: parsing and validating the config file (every bad key reported, by name, at once) and the
//! paths of every file the control plane keeps. Never creates or writes files (see `init`).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

pub const CONFIG_FILE: &str = "controlplane.toml";

/// Errors loading the config. None is retryable: the operator must fix the file.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: invalid configuration:\n  {}", .errors.join("\n  "))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

/// `DIR/controlplane.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpConfig {
    /// Where agents connect (mTLS WebSocket).
    pub agent_listen: String,
    /// Where the user API listens (HTTPS, bearer token).
    pub api_listen: String,
    /// Heartbeat interval announced in Welcome; a peer silent for three intervals is dead.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// Largest workspace archive accepted at submit.
    #[serde(default = "default_max_archive")]
    pub max_archive_bytes: u64,
    /// Pool used when a submit names none.
    #[serde(default = "default_pool")]
    pub default_pool: String,
    /// Life of the client certificates issued at enrollment and renewal (humantime, e.g. "24h").
    #[serde(default = "default_agent_cert_ttl")]
    pub agent_cert_ttl: String,
    /// How long a disconnected agent keeps its tasks (default: three heartbeat intervals); past
    /// it, assigned tasks are requeued and running ones marked (see `lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// How long a disconnected agent may stay silent before its running tasks end `lost`.
    #[serde(default = "default_lost_after")]
    pub lost_after_ms: u64,
    /// How long a succeeded plan can be approved with the secrets it was submitted with
    /// (humantime, e.g. "24h"): the control plane keeps them in memory until then, then drops
    /// them and the plan must be submitted again.
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl: String,
}

fn default_heartbeat() -> u64 {
    5000
}
fn default_max_archive() -> u64 {
    64 * 1024 * 1024
}
fn default_pool() -> String {
    "default".into()
}
fn default_agent_cert_ttl() -> String {
    "24h".into()
}
fn default_lost_after() -> u64 {
    10 * 60 * 1000
}
fn default_approval_ttl() -> String {
    "24h".into()
}

/// Bounds of `agent_cert_ttl`: long enough to renew at two thirds of it, short enough to matter.
pub const AGENT_CERT_TTL_MIN: Duration = Duration::from_secs(10 * 60);
pub const AGENT_CERT_TTL_MAX: Duration = Duration::from_secs(366 * 24 * 3600);

impl Default for CpConfig {
    fn default() -> Self {
        CpConfig {
            agent_listen: "127.0.0.1:8443".into(),
            api_listen: "127.0.0.1:8444".into(),
            heartbeat_interval_ms: default_heartbeat(),
            max_archive_bytes: default_max_archive(),
            default_pool: default_pool(),
            agent_cert_ttl: default_agent_cert_ttl(),
            lease_ms: None,
            lost_after_ms: default_lost_after(),
            approval_ttl: default_approval_ttl(),
        }
    }
}

impl CpConfig {
    /// Parse and validate the TOML text of a config file.
    pub fn parse(path: &Path, text: &str) -> Result<CpConfig, ConfigError> {
        let cfg: CpConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let errors = cfg.validate();
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                errors,
            })
        }
    }

    pub fn load(path: &Path) -> Result<CpConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Every problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = self.agent_listen.parse::<SocketAddr>() {
            errors.push(format!(
                "agent_listen: {:?} is not an IP:port address ({e})",
                self.agent_listen
            ));
        }
        if let Err(e) = self.api_listen.parse::<SocketAddr>() {
            errors.push(format!(
                "api_listen: {:?} is not an IP:port address ({e})",
                self.api_listen
            ));
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms > 3_600_000 {
            errors.push(format!(
                "heartbeat_interval_ms: must be 1..=3600000, got {}",
                self.heartbeat_interval_ms
            ));
        }
        if self.max_archive_bytes == 0
            || self.max_archive_bytes > delegate_protocol::limits::MAX_BLOB
        {
            errors.push(format!(
                "max_archive_bytes: must be 1..={}, got {}",
                delegate_protocol::limits::MAX_BLOB,
                self.max_archive_bytes
            ));
        }
        if self.default_pool.is_empty()
            || self.default_pool.len() > delegate_protocol::limits::MAX_NAME
        {
            errors.push("default_pool: must be 1..=256 bytes".into());
        }
        if let Err(e) = parse_agent_cert_ttl(&self.agent_cert_ttl) {
            errors.push(format!("agent_cert_ttl: {e}"));
        }
        if let Err(e) = parse_approval_ttl(&self.approval_ttl) {
            errors.push(format!("approval_ttl: {e}"));
        }
        let lease = self.lease_policy();
        if let Some(l) = self.lease_ms {
            if l <= self.heartbeat_interval_ms || l > 24 * 3_600_000 {
                errors.push(format!(
                    "lease_ms: must be more than heartbeat_interval_ms ({}) and at most 86400000, got {l}",
                    self.heartbeat_interval_ms
                ));
            }
        }
        if self.lost_after_ms < lease.lease_ms as u64 || self.lost_after_ms > 7 * 24 * 3_600_000 {
            errors.push(format!(
                "lost_after_ms: must be at least the lease ({} ms) and at most 604800000, got {}",
                lease.lease_ms, self.lost_after_ms
            ));
        }
        errors
    }

    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8443)))
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8444)))
    }

    /// The lease rules (`lease_ms` defaults to three heartbeat intervals).
    pub fn lease_policy(&self) -> crate::lease::LeasePolicy {
        let lease = self
            .lease_ms
            .unwrap_or(self.heartbeat_interval_ms.saturating_mul(3));
        crate::lease::LeasePolicy {
            lease_ms: lease.min(i64::MAX as u64) as i64,
            lost_after_ms: self.lost_after_ms.min(i64::MAX as u64) as i64,
        }
    }

    /// `agent_cert_ttl` as a duration (validated at load; the default if it somehow is not).
    pub fn agent_cert_ttl(&self) -> Duration {
        parse_agent_cert_ttl(&self.agent_cert_ttl).unwrap_or(Duration::from_secs(24 * 3600))
    }

    /// `approval_ttl` as a duration (validated at load; the default if it somehow is not).
    pub fn approval_ttl(&self) -> Duration {
        parse_approval_ttl(&self.approval_ttl).unwrap_or(Duration::from_secs(24 * 3600))
    }

    pub fn to_toml(&self) -> String {
        // Plain strings and integers: serialisation cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

/// A humantime duration within [`AGENT_CERT_TTL_MIN`]..=[`AGENT_CERT_TTL_MAX`].
pub fn parse_agent_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like \"24h\" ({e})"))?;
    if !(AGENT_CERT_TTL_MIN..=AGENT_CERT_TTL_MAX).contains(&d) {
        return Err(format!("{s:?} is outside 10m..=366d"));
    }
    Ok(d)
}

/// Bounds of `approval_ttl`: secrets of an unapproved plan stay in memory at most a month.
pub const APPROVAL_TTL_MIN: Duration = Duration::from_secs(60);
pub const APPROVAL_TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// A humantime duration within [`APPROVAL_TTL_MIN`]..=[`APPROVAL_TTL_MAX`].
pub fn parse_approval_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like \"24h\" ({e})"))?;
    if !(APPROVAL_TTL_MIN..=APPROVAL_TTL_MAX).contains(&d) {
        return Err(format!("{s:?} is outside 1m..=30d"));
    }
    Ok(d)
}

/// Paths inside a control plane's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.tls_dir().join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.tls_dir().join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.tls_dir().join("server.key")
    }
    pub fn api_token(&self) -> PathBuf {
        self.root.join("api-token")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("cp.db")
    }
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
    /// At-rest keys: `<id>.key` files (0600) and `current`.
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn agents_dir(&self) -> PathBuf {
        self.root.join("agents")
    }
    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.agents_dir().join(name)
    }
    /// Written by `serve` once it has bound its listeners: the actual addresses (useful when the
    /// config asks for port 0). Removed on clean shutdown.
    pub fn listen_file(&self) -> PathBuf {
        self.root.join("listen.json")
    }
    /// True when the directory already holds a control plane (any of its key files).
    pub fn is_initialised(&self) -> bool {
        self.config().exists() || self.ca_key().exists() || self.db().exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip() {
        let cfg = CpConfig::default();
        let text = cfg.to_toml();
        assert!(text.contains("agent_listen = \"127.0.0.1:8443\""));
        assert_eq!(CpConfig::parse(Path::new("x"), &text).unwrap(), cfg);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = CpConfig::parse(
            Path::new("cp.toml"),
            "agent_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nbogus = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn all_errors_reported_at_once() {
        let err = CpConfig::parse(
            Path::new("cp.toml"),
            "agent_listen = \"nope\"\napi_listen = \"x:y\"\nheartbeat_interval_ms = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("agent_listen"), "{err}");
        assert!(err.contains("api_listen"), "{err}");
        assert!(err.contains("heartbeat_interval_ms"), "{err}");
    }

    #[test]
    fn lease_defaults_and_bounds() {
        let base = "agent_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\n";
        let cfg = CpConfig::parse(Path::new("x"), base).unwrap();
        let p = cfg.lease_policy();
        assert_eq!(p.lease_ms, 15_000, "three heartbeat intervals");
        assert_eq!(p.lost_after_ms, 600_000);
        let cfg = CpConfig::parse(
            Path::new("x"),
            &format!("{base}lease_ms = 20000\nlost_after_ms = 60000\n"),
        )
        .unwrap();
        assert_eq!(cfg.lease_policy().lease_ms, 20_000);
        assert_eq!(cfg.lease_policy().lost_after_ms, 60_000);
        assert_eq!(
            CpConfig::parse(Path::new("x"), &cfg.to_toml()).unwrap(),
            cfg
        );
        let err = CpConfig::parse(
            Path::new("x"),
            &format!("{base}lease_ms = 1000\nlost_after_ms = 10\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("lease_ms") && err.contains("lost_after_ms"),
            "{err}"
        );
    }

    #[test]
    fn approval_ttl_parsed_and_bounded() {
        let base = "agent_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\n";
        let cfg = CpConfig::parse(Path::new("x"), base).unwrap();
        assert_eq!(cfg.approval_ttl(), Duration::from_secs(24 * 3600));
        let cfg =
            CpConfig::parse(Path::new("x"), &format!("{base}approval_ttl = \"90m\"\n")).unwrap();
        assert_eq!(cfg.approval_ttl(), Duration::from_secs(5400));
        for bad in ["\"soon\"", "\"10s\"", "\"60d\""] {
            let err = CpConfig::parse(Path::new("x"), &format!("{base}approval_ttl = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("approval_ttl:"), "{err}");
        }
    }

    #[test]
    fn agent_cert_ttl_parsed_and_bounded() {
        let base = "agent_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\n";
        let cfg = CpConfig::parse(Path::new("x"), base).unwrap();
        assert_eq!(cfg.agent_cert_ttl(), Duration::from_secs(24 * 3600));
        let cfg =
            CpConfig::parse(Path::new("x"), &format!("{base}agent_cert_ttl = \"2h\"\n")).unwrap();
        assert_eq!(cfg.agent_cert_ttl(), Duration::from_secs(7200));
        for bad in ["1s", "400d", "soon"] {
            let err = CpConfig::parse(
                Path::new("x"),
                &format!("{base}agent_cert_ttl = \"{bad}\"\n"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("agent_cert_ttl"), "{err}");
        }
    }
}
