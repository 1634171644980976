//! `delegate-cp init`: create a data directory — config, agent CA, server certificate, API token,
//! at-rest key, database, and one ready-to-run bundle per agent.
//!
//! Owns: the data directory layout on disk and file modes (private keys, the at-rest key and the
//! token 0600). Never overwrites an existing control plane or an existing at-rest key.

use crate::at_rest::AtRest;
use crate::config::{CpConfig, DataDir};
use crate::pki::{Ca, PkiError, Validity};
use crate::store::{Store, StoreError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors from init. None is retryable as such: fix the input or pick another directory.
#[derive(Debug, Error)]
pub enum InitError {
    #[error("{0} already holds a control plane; refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("at-rest key: {0}")]
    Keys(String),
}

#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    pub agents: Vec<String>,
    pub agent_listen: Option<String>,
    pub api_listen: Option<String>,
    pub sans: Vec<String>,
}

/// What init created.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub config: CpConfig,
    /// `DIR/agents/NAME/agent.toml` for each agent.
    pub agent_configs: Vec<PathBuf>,
}

pub fn init(dd: &DataDir, opts: &InitOptions) -> Result<InitReport, InitError> {
    if dd.is_initialised() || dd.agents_dir().exists() || dd.tls_dir().exists() {
        return Err(InitError::AlreadyInitialised(dd.root.clone()));
    }
    let mut config = CpConfig::default();
    if let Some(a) = &opts.agent_listen {
        config.agent_listen = a.clone();
    }
    if let Some(a) = &opts.api_listen {
        config.api_listen = a.clone();
    }
    let errors = config.validate();
    if !errors.is_empty() {
        return Err(InitError::InvalidInput(errors.join("; ")));
    }
    let mut seen = std::collections::BTreeSet::new();
    for name in &opts.agents {
        crate::pki::check_agent_name(name)?;
        if !seen.insert(name) {
            return Err(InitError::InvalidInput(format!(
                "agent {name:?} given twice"
            )));
        }
    }
    for san in &opts.sans {
        if !valid_san(san) {
            return Err(InitError::InvalidInput(format!(
                "--san {san:?} is not a DNS name or IP address"
            )));
        }
    }

    mkdir(&dd.root, 0o700)?;
    mkdir(&dd.tls_dir(), 0o700)?;
    let ca = Ca::generate("Delegate agent CA")?;
    write(&dd.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
    write(&dd.ca_key(), ca.key_pem().as_bytes(), 0o600)?;
    let server = ca.issue_server(&opts.sans)?;
    write(&dd.server_cert(), server.cert_pem.as_bytes(), 0o644)?;
    write(&dd.server_key(), server.key_pem.as_bytes(), 0o600)?;
    write(
        &dd.api_token(),
        format!("{}\n", new_token()).as_bytes(),
        0o600,
    )?;

    let host = opts
        .sans
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".into());
    let url_host = if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host
    };
    let url = format!("wss://{url_host}:{}/v1/agent", config.agent_addr().port());
    let mut agent_configs = Vec::new();
    if !opts.agents.is_empty() {
        mkdir(&dd.agents_dir(), 0o700)?;
    }
    for name in &opts.agents {
        agent_configs.push(write_agent_bundle(
            dd,
            &ca,
            name,
            &config.default_pool,
            &url,
        )?);
    }
    // The at-rest key: `DIR/keys/<id>.key`, 0600. No `current` file, so `DELEGATE_CP_KEY`, when
    // set at serve, is the current key instead (see `at_rest`); `keys rotate` names one later.
    // Keys someone placed there beforehand are kept.
    // A leftover temporary key file (dot-prefixed) is no key.
    let has_key = delegate_crypto::has_key_files(&dd.keys_dir())
        .map_err(|e| InitError::Keys(e.to_string()))?;
    if !has_key {
        delegate_crypto::generate_key_file(&dd.keys_dir())
            .map_err(|e| InitError::Keys(e.to_string()))?;
    }
    // The database last: its presence is one of the "already initialised" markers.
    drop(Store::open(&dd.db(), AtRest::default())?);
    write(&dd.config(), config.to_toml().as_bytes(), 0o644)?;
    Ok(InitReport {
        config,
        agent_configs,
    })
}

/// `DIR/agents/NAME/{agent.key, agent.pem, ca.pem, agent.toml}`; returns the agent.toml path.
pub fn write_agent_bundle(
    dd: &DataDir,
    ca: &Ca,
    name: &str,
    pool: &str,
    url: &str,
) -> Result<PathBuf, InitError> {
    let dir = dd.agent_dir(name);
    mkdir(&dir, 0o700)?;
    let issued = ca.issue_agent(name, Validity::days(365))?;
    write(&dir.join("agent.key"), issued.key_pem.as_bytes(), 0o600)?;
    write(&dir.join("agent.pem"), issued.cert_pem.as_bytes(), 0o644)?;
    write(&dir.join("ca.pem"), ca.cert_pem().as_bytes(), 0o644)?;
    let path = dir.join("agent.toml");
    write(&path, agent_toml(name, pool, url).as_bytes(), 0o644)?;
    Ok(path)
}

/// The agent's config file; paths are relative to the file's own directory.
pub fn agent_toml(name: &str, pool: &str, url: &str) -> String {
    format!(
        r#"data_dir = "data"
[control_plane]
url = "{url}"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[agent]
name = "{name}"
pool = "{pool}"
slots = 2
[sandbox]
image = "delegate-sandbox:local"
pull_policy = "if-missing"
[log]
level = "info"
format = "text"
"#
    )
}

/// A DNS name (letters, digits, '-', '.', a leading "*." wildcard) or an IP address.
pub fn valid_san(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = s.strip_prefix("*.").unwrap_or(s);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// 32 random bytes, hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut bytes[..]);
    hex::encode(bytes)
}

fn mkdir(path: &Path, mode: u32) -> Result<(), InitError> {
    use std::os::unix::fs::DirBuilderExt;
    let r = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path);
    r.map_err(|source| InitError::Io {
        path: path.into(),
        source,
    })
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), InitError> {
    let io = |source| InitError::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_layout_and_refuses_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("cp"));
        let opts = InitOptions {
            agents: vec!["a1".into(), "a2".into()],
            agent_listen: Some("127.0.0.1:9443".into()),
            sans: vec!["cp.internal".into()],
            ..Default::default()
        };
        let report = init(&dd, &opts).unwrap();
        assert_eq!(report.agent_configs.len(), 2);
        let keys: Vec<_> = std::fs::read_dir(dd.keys_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(keys.len(), 1, "one at-rest key: {keys:?}");
        assert_eq!(mode(&dd.keys_dir()), 0o700);
        for p in [
            dd.ca_key(),
            dd.server_key(),
            dd.api_token(),
            dd.agent_dir("a1").join("agent.key"),
            keys[0].clone(),
        ] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        let at = crate::at_rest::AtRest::load(&dd.keys_dir(), None).unwrap();
        assert!(keys[0].ends_with(format!("{}.key", at.current_key_id())));
        let toml = std::fs::read_to_string(dd.agent_dir("a2").join("agent.toml")).unwrap();
        assert!(
            toml.contains("url = \"wss://cp.internal:9443/v1/agent\""),
            "{toml}"
        );
        assert!(toml.contains("name = \"a2\""));
        let cfg = CpConfig::load(&dd.config()).unwrap();
        assert_eq!(cfg.agent_listen, "127.0.0.1:9443");
        assert_eq!(cfg.api_listen, "127.0.0.1:8444");
        assert_eq!(
            std::fs::read_to_string(dd.api_token())
                .unwrap()
                .trim()
                .len(),
            64
        );

        let err = init(&dd, &opts).unwrap_err();
        assert!(matches!(err, InitError::AlreadyInitialised(_)), "{err}");
    }

    #[test]
    fn a_leftover_temporary_key_file_is_no_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("cp"));
        std::fs::create_dir_all(dd.keys_dir()).unwrap();
        std::fs::write(dd.keys_dir().join(".tmp-abc.key"), b"partial").unwrap();
        init(&dd, &InitOptions::default()).unwrap();
        let keys: Vec<String> = std::fs::read_dir(dd.keys_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".key") && !n.starts_with('.'))
            .collect();
        assert_eq!(keys.len(), 1, "a real key was generated: {keys:?}");
        let at = crate::at_rest::AtRest::load(&dd.keys_dir(), None).unwrap();
        assert_eq!(keys[0], format!("{}.key", at.current_key_id()));
    }

    #[test]
    fn san_names() {
        for ok in [
            "cp.internal",
            "10.0.0.5",
            "::1",
            "*.example.com",
            "localhost",
        ] {
            assert!(valid_san(ok), "{ok}");
        }
        for bad in ["", "a b", "a..b", "-a.b", "x/y", "host:443"] {
            assert!(!valid_san(bad), "{bad}");
        }
    }

    #[test]
    fn bad_agent_name_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("cp"));
        let opts = InitOptions {
            agents: vec!["../evil".into()],
            ..Default::default()
        };
        assert!(init(&dd, &opts).is_err());
        assert!(!dd.root.exists());
    }
}
