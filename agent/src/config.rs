//! The agent's configuration: a TOML file plus `DELEGATE_*` environment overrides, read once at
//! start and validated in one pass that reports every bad key with its path.
//!
//! Layers:
//! - [`FileConfig`] and its section structs are the raw shape of the file (serde,
//!   `deny_unknown_fields`, every key optional so that a missing key is reported by
//!   [`FileConfig::validate`] rather than by serde).
//! - [`load`] / [`load_with_env`] merge the file and the environment with the `config` crate, check
//!   every key on its own (so one typo does not hide the next), then validate the values.
//! - [`Config`] is the validated result the daemon runs on: absolute paths, parsed durations and
//!   sizes, a parsed `wss://` endpoint.
//!
//! Environment overrides: `DELEGATE_` + the key path in upper case joined by `__`, e.g.
//! `DELEGATE_SANDBOX__IMAGE`, `DELEGATE_CONTROL_PLANE__URL`, `DELEGATE_DATA_DIR`. Lists
//! (`egress.allow`, `egress.deny`) accept a comma-separated string from the environment.
//! Top-level variables that name no key (e.g. the control plane's `DELEGATE_CP_DATA_DIR`) are
//! reported as warnings, not errors, since other programs share the prefix.
//!
//! This module never opens a connection and never logs; it never echoes a secret (URL user info is
//! redacted from messages). It reads the certificate files only in [`Config::check_files`].

use crate::egress::matcher::{normalize_host, Host};
use crate::egress::rules::{Policy, Rule};
use crate::sandbox::egress_wiring::{EgressPolicy, EgressSettings, FirewallMode};
use crate::sandbox::{PullPolicy, SandboxSettings};
use crate::tls;
use config::{ConfigError as RawError, Environment, File, FileFormat, Map, Value, ValueKind};
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "DELEGATE";

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted key path, e.g. `control_plane.url`.
    pub key: String,
    pub message: String,
}

impl Issue {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why the configuration could not be used. None of these is retryable: the operator must fix the
/// file or the environment.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("{}", format_issues(path, issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

impl ConfigError {
    /// The whole error on one line (for a start-up message).
    pub fn one_line(&self) -> String {
        match self {
            ConfigError::Read { .. } => self.to_string(),
            ConfigError::Invalid { path, issues } => format!(
                "invalid configuration {}: {}",
                path.display(),
                issues
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }

    /// The individual problems (one for a read error).
    pub fn issues(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid { issues, .. } => issues.iter().map(|i| i.to_string()).collect(),
        }
    }
}

fn format_issues(path: &Path, issues: &[Issue]) -> String {
    let mut s = format!(
        "invalid configuration {} ({} error{}):",
        path.display(),
        issues.len(),
        if issues.len() == 1 { "" } else { "s" }
    );
    for i in issues {
        s.push_str("\n  ");
        s.push_str(&i.to_string());
    }
    s
}

/// `Deserialize` for a fieldless enum from one of a fixed set of strings, with a message that lists
/// them (serde's derived message names the Rust type instead).
macro_rules! string_enum {
    ($ty:ident, [$(($variant:path, $text:literal)),+ $(,)?]) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $(if s == $text { return Ok($variant); })+
                Err(de::Error::custom(format!(
                    "expected one of {}, got {s:?}",
                    [$($text),+].join(" | ")
                )))
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Raw file shape
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub control_plane: ControlPlaneFile,
    pub agent: AgentFile,
    pub sandbox: SandboxFile,
    pub egress: EgressFile,
    pub log: LogFile,
    pub metrics: MetricsFile,
    pub spool: SpoolFile,
}

/// The sections of [`FileConfig`]; each is checked key by key.
const SECTIONS: &[&str] = &[
    "control_plane",
    "agent",
    "sandbox",
    "egress",
    "log",
    "metrics",
    "spool",
];

/// `[spool]`: the encrypted spool of unacknowledged task output.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolFile {
    /// Bound on the spool's files: bytes, or a size like `"256m"`; at least 4m.
    pub max_bytes: Option<crate::spool::SizeSetting>,
}

/// `[metrics]`: off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsFile {
    /// `127.0.0.1:9464`-style loopback address, or `unix:/run/delegate/metrics.sock`.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneFile {
    pub url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub spki_pin: Option<String>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentFile {
    pub name: Option<String>,
    pub pool: Option<String>,
    pub slots: Option<u32>,
    pub labels: BTreeMap<String, String>,
    /// How long SIGTERM waits for running tasks before closing the link anyway.
    pub drain_timeout: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicyName {
    Never,
    IfMissing,
    Always,
}

string_enum!(
    PullPolicyName,
    [
        (PullPolicyName::Never, "never"),
        (PullPolicyName::IfMissing, "if-missing"),
        (PullPolicyName::Always, "always")
    ]
);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxFile {
    pub image: Option<String>,
    pub pull_policy: Option<PullPolicyName>,
    /// Docker memory limit: bytes, or a number with a `k`/`m`/`g`/`t` suffix (powers of 1024).
    pub memory: Option<String>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    pub timeout_default: Option<String>,
    pub timeout_max: Option<String>,
    pub cancel_grace: Option<String>,
    pub max_archive_bytes: Option<u64>,
    pub max_unpacked_bytes: Option<u64>,
    pub max_files: Option<u64>,
    pub plugin_cache: Option<bool>,
    /// Air-gapped pools: an HTTPS provider network mirror (see `mirror`).
    pub provider_mirror: Option<String>,
    /// Air-gapped pools: a provider directory on the host, mounted read-only into the sandbox.
    pub provider_filesystem_mirror: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressFile {
    pub allow: StringList,
    pub deny: StringList,
    /// Fixed addresses for names (split-horizon DNS, mirrors known by address): the proxy uses
    /// these instead of asking the system resolver. `{ "mirror.internal" = "10.1.2.3" }` or a list.
    pub hosts: BTreeMap<String, StringList>,
    /// Most connections one task's proxy serves at once (tunnels included).
    pub max_connections: Option<u64>,
    /// How task bridges are isolated from the host's own services.
    pub firewall: Option<FirewallMode>,
}

string_enum!(
    FirewallMode,
    [
        (FirewallMode::Auto, "auto"),
        (FirewallMode::Nft, "nft"),
        (FirewallMode::Iptables, "iptables"),
        (FirewallMode::Off, "off")
    ]
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

string_enum!(
    LogLevel,
    [
        (LogLevel::Error, "error"),
        (LogLevel::Warn, "warn"),
        (LogLevel::Info, "info"),
        (LogLevel::Debug, "debug"),
        (LogLevel::Trace, "trace")
    ]
);

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

string_enum!(
    LogFormat,
    [(LogFormat::Text, "text"), (LogFormat::Json, "json")]
);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogFile {
    pub level: Option<LogLevel>,
    pub format: Option<LogFormat>,
}

/// A list of strings; from the environment also a comma-separated string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings or a comma-separated string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StringList, E> {
                Ok(StringList(
                    s.split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(String::from)
                        .collect(),
                ))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StringList(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------------------------

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (absolute when given relative to the working directory is not
    /// required: it is used only in messages).
    pub file: PathBuf,
    pub data_dir: PathBuf,
    pub control_plane: ControlPlaneConfig,
    pub agent: AgentConfig,
    pub sandbox: SandboxConfig,
    pub egress: EgressConfig,
    pub log: LogConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not at all.
    pub metrics: Option<crate::metrics::MetricsListen>,
    pub spool: SpoolConfig,
    /// Things worth a log line that do not stop the agent (e.g. an unused `DELEGATE_*` variable).
    pub warnings: Vec<String>,
}

/// The `[spool]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolConfig {
    /// When the spool's files reach this, task output waits for acknowledgements.
    pub max_bytes: u64,
}

/// Where the agent endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The full `wss://` URL as configured.
    pub url: String,
    /// Host name or IP address (without IPv6 brackets), used for TCP and as the TLS server name.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    pub endpoint: Endpoint,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// SHA-256 of the server certificate's SubjectPublicKeyInfo.
    pub spki_pin: Option<[u8; 32]>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub pool: String,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    pub drain_timeout: Duration,
}

/// The `[sandbox]` section. Keys left out stay `None` and take the sandbox's own defaults when
/// converted to its settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxConfig {
    pub image: Option<String>,
    pub pull_policy: Option<PullPolicy>,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
    pub default_timeout: Option<Duration>,
    pub max_timeout: Option<Duration>,
    pub cancel_grace: Option<Duration>,
    pub max_archive_bytes: Option<u64>,
    pub max_unpacked_bytes: Option<u64>,
    pub max_files: Option<u64>,
    pub plugin_cache: Option<bool>,
    pub extra_labels: BTreeMap<String, String>,
    /// `provider_mirror` or `provider_filesystem_mirror` (at most one).
    pub provider_mirror: Option<crate::mirror::ProviderMirror>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressConfig {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// `allow` and `deny` parsed (every entry valid).
    pub policy: Policy,
    /// `egress.hosts`, names normalised.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    pub max_connections: Option<usize>,
    pub firewall: FirewallMode,
}

/// Most connections a task's proxy may be configured to serve at once.
const MAX_EGRESS_CONNECTIONS: u64 = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
}

pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 500;
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 30_000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_POOL: &str = "default";
pub const DEFAULT_SLOTS: u32 = 1;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_SLOTS: u32 = 1024;

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Load the file at `path`, apply `DELEGATE_*` variables of this process, validate.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, None)
}

/// As [`load`], but with the environment given as a map (`None`: this process's environment).
/// Tests use the map so they never touch process-global state.
pub fn load_with_env(path: &Path, env: Option<Map<String, String>>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    // Relative paths in the file are relative to the file, wherever the agent was started from.
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base = absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    load_str(&text, path, &base, env)
}

/// Load from TOML text; relative paths resolve against `base_dir`; `path` is used in messages.
pub fn load_str(
    text: &str,
    path: &Path,
    base_dir: &Path,
    env: Option<Map<String, String>>,
) -> Result<Config, ConfigError> {
    let environment = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .source(env);
    let merged = config::Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .add_source(environment)
        .build()
        .map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            message: describe(&e),
        })?;
    // The cache keeps each value's origin (file or environment); deserializing would drop it.
    let root: Map<String, Value> = merged.cache.into_table().map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        message: describe(&e),
    })?;

    let mut issues = Vec::new();
    let mut warnings = Vec::new();
    let sane = check_structure(root, &mut issues, &mut warnings);
    let file: FileConfig = match Value::new(None, ValueKind::Table(sane)).try_deserialize() {
        Ok(f) => f,
        Err(e) => {
            // check_structure removed every key that fails on its own; this is a backstop.
            issues.push(Issue::new("(config)", describe(&e)));
            FileConfig::default()
        }
    };
    match file.validate(base_dir) {
        Ok(mut cfg) if issues.is_empty() => {
            cfg.file = path.to_path_buf();
            cfg.warnings = warnings;
            Ok(cfg)
        }
        Ok(_) => Err(invalid(path, issues)),
        Err(more) => {
            // Keys that already failed structurally are reported once, not again as "missing".
            for i in more {
                if !issues.iter().any(|x| x.key == i.key) {
                    issues.push(i);
                }
            }
            Err(invalid(path, issues))
        }
    }
}

fn invalid(path: &Path, mut issues: Vec<Issue>) -> ConfigError {
    issues.sort_by(|a, b| a.key.cmp(&b.key));
    ConfigError::Invalid {
        path: path.to_path_buf(),
        issues,
    }
}

/// Check every key on its own against the serde shape, so that all unknown keys and all values
/// of the wrong type are reported at once. Returns the map without the bad keys.
fn check_structure(
    root: Map<String, Value>,
    issues: &mut Vec<Issue>,
    warnings: &mut Vec<String>,
) -> Map<String, Value> {
    let mut sane = Map::new();
    for (key, value) in root {
        if SECTIONS.contains(&key.as_str()) {
            let origin = value.origin().map(str::to_string);
            match value.into_table() {
                Ok(table) => {
                    let kept = check_section(&key, table, issues);
                    sane.insert(key, Value::new(origin.as_ref(), ValueKind::Table(kept)));
                }
                Err(_) => issues.push(Issue::new(&key, "must be a table (a [section])")),
            }
            continue;
        }
        let from_env = value.origin() == Some("the environment");
        match check_entry::<FileConfig>(&key, &value) {
            Ok(()) => {
                sane.insert(key, value);
            }
            // The spool key is read by the binary itself, never through the configuration.
            Err(_) if from_env && key == "spool_key" => {}
            Err(msg) if from_env && msg.starts_with("unknown field") => {
                let var = format!("{ENV_PREFIX}_{}", key.to_uppercase());
                warnings.push(format!(
                    "environment variable {var} is not an agent setting; ignored"
                ));
            }
            Err(msg) => issues.push(Issue::new(&key, msg)),
        }
    }
    sane
}

fn check_section(
    section: &str,
    table: Map<String, Value>,
    issues: &mut Vec<Issue>,
) -> Map<String, Value> {
    let mut kept = Map::new();
    for (key, value) in table {
        let result = match section {
            "control_plane" => check_entry::<ControlPlaneFile>(&key, &value),
            "agent" => check_entry::<AgentFile>(&key, &value),
            "sandbox" => check_entry::<SandboxFile>(&key, &value),
            "egress" => check_entry::<EgressFile>(&key, &value),
            "log" => check_entry::<LogFile>(&key, &value),
            "metrics" => check_entry::<MetricsFile>(&key, &value),
            "spool" => check_entry::<SpoolFile>(&key, &value),
            _ => Ok(()),
        };
        match result {
            Ok(()) => {
                kept.insert(key, value);
            }
            Err(msg) => issues.push(Issue::new(format!("{section}.{key}"), msg)),
        }
    }
    kept
}

/// Deserialize `T` from a table holding only `key`: fails exactly when that key is unknown to `T`
/// or its value has the wrong type.
fn check_entry<T: DeserializeOwned>(key: &str, value: &Value) -> Result<(), String> {
    let mut one = Map::new();
    one.insert(key.to_string(), value.clone());
    Value::new(None, ValueKind::Table(one))
        .try_deserialize::<T>()
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// A message for a `config` crate error without repeating the key (the caller prefixes it).
fn describe(e: &RawError) -> String {
    match e {
        RawError::Type {
            origin,
            unexpected,
            expected,
            ..
        } => {
            let from = match origin.as_deref() {
                Some("the environment") => " (from the environment)",
                _ => "",
            };
            format!("expected {expected}, got {unexpected}{from}")
        }
        RawError::At { error, .. } => describe(error),
        RawError::Message(m) => m.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

impl FileConfig {
    /// Check every value and build the [`Config`]; relative paths resolve against `base_dir`.
    /// Returns every problem found, each naming its key.
    pub fn validate(&self, base_dir: &Path) -> Result<Config, Vec<Issue>> {
        let mut issues = Vec::new();
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };
        let required_path = |key: &str, p: &Option<PathBuf>, issues: &mut Vec<Issue>| match p {
            Some(p) if !p.as_os_str().is_empty() => resolve(p),
            _ => {
                issues.push(Issue::new(key, "missing (required)"));
                PathBuf::new()
            }
        };

        let data_dir = required_path("data_dir", &self.data_dir, &mut issues);

        // [control_plane]
        let cp = &self.control_plane;
        let endpoint = match &cp.url {
            None => {
                issues.push(Issue::new("control_plane.url", "missing (required)"));
                None
            }
            Some(u) => match parse_wss_url(u) {
                Ok(e) => Some(e),
                Err(m) => {
                    issues.push(Issue::new("control_plane.url", m));
                    None
                }
            },
        };
        let ca_file = required_path("control_plane.ca_file", &cp.ca_file, &mut issues);
        let cert_file = required_path("control_plane.cert_file", &cp.cert_file, &mut issues);
        let key_file = required_path("control_plane.key_file", &cp.key_file, &mut issues);
        let spki_pin = match &cp.spki_pin {
            None => None,
            Some(p) => match tls::parse_pin(p) {
                Ok(pin) => Some(pin),
                Err(m) => {
                    issues.push(Issue::new("control_plane.spki_pin", m));
                    None
                }
            },
        };
        let positive_ms = |key: &str, v: Option<u64>, default: u64, issues: &mut Vec<Issue>| {
            let v = v.unwrap_or(default);
            if v == 0 {
                issues.push(Issue::new(key, "must be at least 1 (milliseconds)"));
            }
            Duration::from_millis(v)
        };
        let backoff_initial = positive_ms(
            "control_plane.backoff_initial_ms",
            cp.backoff_initial_ms,
            DEFAULT_BACKOFF_INITIAL_MS,
            &mut issues,
        );
        let backoff_max = positive_ms(
            "control_plane.backoff_max_ms",
            cp.backoff_max_ms,
            DEFAULT_BACKOFF_MAX_MS.max(backoff_initial.as_millis() as u64),
            &mut issues,
        );
        if backoff_max < backoff_initial {
            issues.push(Issue::new(
                "control_plane.backoff_max_ms",
                format!(
                    "must be at least backoff_initial_ms ({}), got {}",
                    backoff_initial.as_millis(),
                    backoff_max.as_millis()
                ),
            ));
        }
        let connect_timeout = positive_ms(
            "control_plane.connect_timeout_ms",
            cp.connect_timeout_ms,
            DEFAULT_CONNECT_TIMEOUT_MS,
            &mut issues,
        );

        // [agent]
        let a = &self.agent;
        let name = match &a.name {
            None => {
                issues.push(Issue::new("agent.name", "missing (required)"));
                String::new()
            }
            Some(n) => {
                if let Err(m) = check_name(n) {
                    issues.push(Issue::new("agent.name", m));
                }
                n.clone()
            }
        };
        let pool = a.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string());
        if let Err(m) = check_name(&pool) {
            issues.push(Issue::new("agent.pool", m));
        }
        let slots = a.slots.unwrap_or(DEFAULT_SLOTS);
        if slots == 0 || slots > MAX_SLOTS {
            issues.push(Issue::new(
                "agent.slots",
                format!("must be 1..={MAX_SLOTS}, got {slots}"),
            ));
        }
        check_labels("agent.labels", &a.labels, &mut issues);
        let drain_timeout =
            duration_key("agent.drain_timeout", &a.drain_timeout, &mut issues, false)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT);

        // [sandbox]
        let sandbox = self.sandbox.validate(&mut issues);

        // [metrics]
        let metrics = match &self.metrics.listen {
            None => None,
            Some(l) => match crate::metrics::MetricsListen::parse(l) {
                Ok(m) => Some(m),
                Err(e) => {
                    issues.push(Issue::new("metrics.listen", e));
                    None
                }
            },
        };

        // [egress]
        for (key, list) in [
            ("egress.allow", &self.egress.allow),
            ("egress.deny", &self.egress.deny),
        ] {
            if list.0.len() > delegate_protocol::limits::MAX_ENTRIES {
                issues.push(Issue::new(
                    key,
                    format!(
                        "{} entries, limit {}",
                        list.0.len(),
                        delegate_protocol::limits::MAX_ENTRIES
                    ),
                ));
            }
            for (i, e) in list.0.iter().enumerate() {
                if e.trim().is_empty() {
                    issues.push(Issue::new(format!("{key}[{i}]"), "must not be empty"));
                } else if let Err(err) = Rule::parse(e) {
                    issues.push(Issue::new(format!("{key}[{i}]"), rule_message(&err)));
                }
            }
        }
        let egress = self.egress.validate(&mut issues);

        let log = LogConfig {
            level: self.log.level.unwrap_or(LogLevel::Info),
            format: self.log.format.unwrap_or(LogFormat::Text),
        };
        let spool = SpoolConfig {
            max_bytes: crate::spool::max_bytes_setting(self.spool.max_bytes.as_ref())
                .unwrap_or_else(|m| {
                    issues.push(Issue::new("spool.max_bytes", m));
                    crate::spool::DEFAULT_MAX_BYTES
                }),
        };

        if !issues.is_empty() {
            return Err(issues);
        }
        let Some(endpoint) = endpoint else {
            return Err(vec![Issue::new("control_plane.url", "missing (required)")]);
        };
        Ok(Config {
            file: PathBuf::new(),
            data_dir,
            control_plane: ControlPlaneConfig {
                endpoint,
                ca_file,
                cert_file,
                key_file,
                spki_pin,
                backoff_initial,
                backoff_max,
                connect_timeout,
            },
            agent: AgentConfig {
                name,
                pool,
                slots,
                labels: a.labels.clone(),
                drain_timeout,
            },
            sandbox,
            egress,
            log,
            metrics,
            spool,
            warnings: Vec::new(),
        })
    }
}

/// A rule error without its "egress entry" prefix (the issue's key already says where it is).
fn rule_message(e: &crate::egress::rules::RuleError) -> String {
    let text = e.to_string();
    text.strip_prefix("egress entry ")
        .map(str::to_string)
        .unwrap_or(text)
}

impl EgressFile {
    /// Everything but the per-entry checks of `allow`/`deny` (done by the caller).
    fn validate(&self, issues: &mut Vec<Issue>) -> EgressConfig {
        let policy = Policy::parse(&self.allow.0, &self.deny.0).unwrap_or_default();
        let mut hosts = BTreeMap::new();
        for (name, addrs) in &self.hosts {
            let key = format!("egress.hosts.{name:?}");
            let name = match normalize_host(name) {
                Ok(Host::Name(n)) => n,
                Ok(Host::Ip(_)) => {
                    issues.push(Issue::new(key, "must be a host name, not an address"));
                    continue;
                }
                Err(e) => {
                    issues.push(Issue::new(key, e.to_string()));
                    continue;
                }
            };
            if addrs.0.is_empty() {
                issues.push(Issue::new(key, "must list at least one address"));
                continue;
            }
            let mut ips = Vec::new();
            for (i, a) in addrs.0.iter().enumerate() {
                match a.trim().parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => {
                        issues.push(Issue::new(
                            format!("{key}[{i}]"),
                            format!("{a:?} is not an IP address"),
                        ));
                    }
                }
            }
            hosts.insert(name, ips);
        }
        let max_connections = self.max_connections.and_then(|n| {
            if (1..=MAX_EGRESS_CONNECTIONS).contains(&n) {
                usize::try_from(n).ok()
            } else {
                issues.push(Issue::new(
                    "egress.max_connections",
                    format!("must be 1..={MAX_EGRESS_CONNECTIONS}, got {n}"),
                ));
                None
            }
        });
        let firewall = self.firewall.unwrap_or_default();
        EgressConfig {
            allow: self.allow.0.clone(),
            deny: self.deny.0.clone(),
            policy,
            hosts,
            max_connections,
            firewall,
        }
    }
}

impl SandboxFile {
    fn validate(&self, issues: &mut Vec<Issue>) -> SandboxConfig {
        if let Some(image) = &self.image {
            if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
                issues.push(Issue::new(
                    "sandbox.image",
                    "must be a non-empty image reference without spaces",
                ));
            }
        }
        let memory_bytes = self.memory.as_ref().and_then(|m| match parse_size(m) {
            Ok(b) if b < 6 * 1024 * 1024 => {
                issues.push(Issue::new(
                    "sandbox.memory",
                    format!("must be at least 6m (Docker's minimum), got {m:?}"),
                ));
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                issues.push(Issue::new("sandbox.memory", e));
                None
            }
        });
        let nano_cpus = self.cpus.and_then(|c| {
            if c.is_finite() && c > 0.0 && c <= 1024.0 {
                Some((c * 1e9).round() as i64)
            } else {
                issues.push(Issue::new(
                    "sandbox.cpus",
                    format!("must be a number of CPUs in (0, 1024], got {c}"),
                ));
                None
            }
        });
        let pids_limit = self.pids.and_then(|p| {
            if p >= 1 {
                Some(p)
            } else {
                issues.push(Issue::new(
                    "sandbox.pids",
                    format!("must be at least 1, got {p}"),
                ));
                None
            }
        });
        let default_timeout = duration_key(
            "sandbox.timeout_default",
            &self.timeout_default,
            issues,
            false,
        );
        let max_timeout = duration_key("sandbox.timeout_max", &self.timeout_max, issues, false);
        let defaults = SandboxSettings::default();
        if let (Some(d), Some(m)) = (
            default_timeout.or((max_timeout.is_some()).then_some(defaults.default_timeout)),
            max_timeout.or((default_timeout.is_some()).then_some(defaults.max_timeout)),
        ) {
            if d > m {
                issues.push(Issue::new(
                    "sandbox.timeout_default",
                    format!(
                        "must not exceed sandbox.timeout_max ({}), got {}",
                        humantime::format_duration(m),
                        humantime::format_duration(d)
                    ),
                ));
            }
        }
        let cancel_grace = duration_key("sandbox.cancel_grace", &self.cancel_grace, issues, true);
        let mut at_least_one = |key: &str, v: Option<u64>| {
            v.and_then(|v| {
                if v == 0 {
                    issues.push(Issue::new(key, "must be at least 1"));
                    None
                } else {
                    Some(v)
                }
            })
        };
        let max_archive_bytes = at_least_one("sandbox.max_archive_bytes", self.max_archive_bytes);
        let max_unpacked_bytes =
            at_least_one("sandbox.max_unpacked_bytes", self.max_unpacked_bytes);
        let max_files = at_least_one("sandbox.max_files", self.max_files);
        check_labels("sandbox.labels", &self.labels, issues);
        SandboxConfig {
            image: self.image.clone(),
            pull_policy: self.pull_policy.map(|p| match p {
                PullPolicyName::Never => PullPolicy::Never,
                PullPolicyName::IfMissing => PullPolicy::IfMissing,
                PullPolicyName::Always => PullPolicy::Always,
            }),
            memory_bytes,
            nano_cpus,
            pids_limit,
            default_timeout,
            max_timeout,
            cancel_grace,
            max_archive_bytes,
            max_unpacked_bytes,
            max_files,
            plugin_cache: self.plugin_cache,
            provider_mirror: self.provider_mirror(issues),
            extra_labels: self.labels.clone(),
        }
    }
}

impl SandboxFile {
    fn provider_mirror(&self, issues: &mut Vec<Issue>) -> Option<crate::mirror::ProviderMirror> {
        use crate::mirror::{parse_filesystem_mirror, parse_network_mirror, ProviderMirror};
        match (&self.provider_mirror, &self.provider_filesystem_mirror) {
            (Some(_), Some(_)) => {
                issues.push(Issue::new(
                    "sandbox.provider_filesystem_mirror",
                    "set provider_mirror or provider_filesystem_mirror, not both",
                ));
                None
            }
            (Some(url), None) => match parse_network_mirror(url) {
                Ok(u) => Some(ProviderMirror::Network(u)),
                Err(e) => {
                    issues.push(Issue::new("sandbox.provider_mirror", e));
                    None
                }
            },
            (None, Some(path)) => match parse_filesystem_mirror(path) {
                Ok(p) => Some(ProviderMirror::Filesystem(p)),
                Err(e) => {
                    issues.push(Issue::new("sandbox.provider_filesystem_mirror", e));
                    None
                }
            },
            (None, None) => None,
        }
    }
}

fn duration_key(
    key: &str,
    v: &Option<String>,
    issues: &mut Vec<Issue>,
    zero_ok: bool,
) -> Option<Duration> {
    let s = v.as_ref()?;
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() && !zero_ok => {
            issues.push(Issue::new(key, "must be longer than zero"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            issues.push(Issue::new(
                key,
                format!("{s:?} is not a duration like \"30s\", \"10m\" or \"1h\": {e}"),
            ));
            None
        }
    }
}

/// An agent or pool name: 1 to `MAX_NAME` bytes of letters, digits, '.', '_' and '-', starting
/// with a letter or digit.
pub(crate) fn check_name(n: &str) -> Result<(), String> {
    let ok_first = n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if n.is_empty() {
        return Err("must not be empty".into());
    }
    if n.len() > delegate_protocol::limits::MAX_NAME {
        return Err(format!(
            "{} bytes, limit {}",
            n.len(),
            delegate_protocol::limits::MAX_NAME
        ));
    }
    if !ok_first || !ok_rest {
        return Err(format!(
            "{n:?} must start with a letter or digit and hold only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

fn check_labels(key: &str, labels: &BTreeMap<String, String>, issues: &mut Vec<Issue>) {
    use delegate_protocol::limits::{MAX_ENTRIES, MAX_NAME, MAX_TEXT};
    if labels.len() > MAX_ENTRIES {
        issues.push(Issue::new(
            key,
            format!("{} entries, limit {MAX_ENTRIES}", labels.len()),
        ));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_NAME {
            issues.push(Issue::new(
                format!("{key}.{k}"),
                format!("label names must be 1..={MAX_NAME} bytes"),
            ));
        }
        if v.len() > MAX_TEXT {
            issues.push(Issue::new(
                format!("{key}.{k}"),
                format!("label values must be at most {MAX_TEXT} bytes"),
            ));
        }
    }
}

/// Parse a `wss://host[:port][/path]` URL. Anything else is refused with a message that names what
/// is wrong; user info in the URL is never echoed.
pub fn parse_wss_url(url: &str) -> Result<Endpoint, String> {
    use tokio_tungstenite::tungstenite::http::Uri;
    let shown = redact_url(url);
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{shown:?} is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("wss") => {}
        _ => return Err(format!("only wss:// URLs are accepted, got {shown}")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{shown} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("must not carry user information (user:password@); the agent authenticates with its certificate".into());
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("{shown} has no host"));
    }
    Ok(Endpoint {
        url: url.to_string(),
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(443),
    })
}

/// The URL with any `user:password@` replaced, for messages.
fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            return format!("{scheme}://[redacted]@{}", &rest[at + 1..]);
        }
    }
    url.to_string()
}

/// Parse a size: bytes, or a number with a `b`/`k`/`m`/`g`/`t` suffix (optionally followed by `b`
/// or `ib`), in powers of 1024 like Docker.
pub fn parse_size(s: &str) -> Result<i64, String> {
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let unit = unit.trim();
    let mult: f64 = match unit {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("{s:?} is not a size like \"512m\" or \"2g\"")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"512m\" or \"2g\""))?;
    let bytes = n * mult;
    if !bytes.is_finite() || bytes > i64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as i64)
}

impl Config {
    /// The sandbox's settings: the `[sandbox]` keys given, the sandbox's defaults for the others,
    /// and the agent's pool.
    pub fn sandbox_settings(&self) -> SandboxSettings {
        let s = &self.sandbox;
        let d = SandboxSettings::default();
        SandboxSettings {
            image: s.image.clone().unwrap_or(d.image),
            pull_policy: s.pull_policy.unwrap_or(d.pull_policy),
            memory_bytes: s.memory_bytes.unwrap_or(d.memory_bytes),
            nano_cpus: s.nano_cpus.unwrap_or(d.nano_cpus),
            pids_limit: s.pids_limit.unwrap_or(d.pids_limit),
            default_timeout: s.default_timeout.unwrap_or(d.default_timeout),
            max_timeout: s.max_timeout.unwrap_or(d.max_timeout),
            cancel_grace: s.cancel_grace.unwrap_or(d.cancel_grace),
            max_archive_bytes: s.max_archive_bytes.unwrap_or(d.max_archive_bytes),
            max_unpacked_bytes: s.max_unpacked_bytes.unwrap_or(d.max_unpacked_bytes),
            max_files: s.max_files.unwrap_or(d.max_files),
            extra_labels: s.extra_labels.clone(),
            plugin_cache: s.plugin_cache.unwrap_or(d.plugin_cache),
            pool: self.agent.pool.clone(),
            egress: self.egress_settings(),
            provider_mirror: s.provider_mirror.clone(),
        }
    }

    /// The sandbox's egress settings. Each call makes a new policy handle: keep the handle of the
    /// settings the sandbox runs with to replace its policy on reload.
    pub fn egress_settings(&self) -> EgressSettings {
        let e = &self.egress;
        let d = EgressSettings::default();
        EgressSettings {
            policy: EgressPolicy::new(e.policy.clone()),
            hosts: e.hosts.clone(),
            max_connections: e.max_connections.unwrap_or(d.max_connections),
            firewall: e.firewall,
        }
    }

    /// Read the CA bundle, the client certificate and key, and check that they parse and match,
    /// that the certificate is within its validity period, and that the TLS configuration can be
    /// built. Every problem names its key.
    pub fn check_files(&self) -> Vec<Issue> {
        let cp = &self.control_plane;
        let mut issues = Vec::new();
        if let Err(e) = tls::load_ca(&cp.ca_file) {
            issues.push(Issue::new("control_plane.ca_file", e.to_string()));
        }
        let chain = tls::load_cert_chain(&cp.cert_file);
        match &chain {
            Err(e) => issues.push(Issue::new("control_plane.cert_file", e.to_string())),
            Ok(chain) => {
                if let Some(leaf) = chain.first() {
                    if let Err(e) = tls::check_validity(leaf, &cp.cert_file) {
                        issues.push(Issue::new("control_plane.cert_file", e.to_string()));
                    }
                }
            }
        }
        let key = tls::load_private_key(&cp.key_file);
        if let Err(e) = &key {
            issues.push(Issue::new("control_plane.key_file", e.to_string()));
        }
        if issues.is_empty() {
            if let Err(e) =
                tls::client_config(&cp.ca_file, &cp.cert_file, &cp.key_file, cp.spki_pin)
            {
                let key = match &e {
                    tls::TlsError::KeyMismatch { .. } => "control_plane.key_file",
                    _ => "control_plane",
                };
                issues.push(Issue::new(key, e.to_string()));
            }
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "data"
[control_plane]
url = "wss://127.0.0.1:8443/v1/agent"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[agent]
name = "runner-1"
pool = "default"
slots = 2
[sandbox]
image = "delegate-sandbox:local"
pull_policy = "if-missing"
[egress]
[log]
level = "info"
format = "text"
"#;

    fn env(pairs: &[(&str, &str)]) -> Option<Map<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn load_text(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        load_str(
            text,
            Path::new("/etc/delegate/agent.toml"),
            Path::new("/etc/delegate"),
            env(vars),
        )
    }

    fn issues_of(text: &str, vars: &[(&str, &str)]) -> Vec<Issue> {
        match load_text(text, vars) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            Err(e) => panic!("expected issues, got {e}"),
            Ok(_) => panic!("expected issues, config loaded"),
        }
    }

    fn has(issues: &[Issue], key: &str, needle: &str) -> bool {
        issues
            .iter()
            .any(|i| i.key == key && i.message.contains(needle))
    }

    #[test]
    fn spool_max_bytes_from_file_and_environment() {
        let c = load_text(GOOD, &[]).unwrap();
        assert_eq!(c.spool.max_bytes, crate::spool::DEFAULT_MAX_BYTES);
        let c = load_text(&format!("{GOOD}[spool]\nmax_bytes = \"64m\"\n"), &[]).unwrap();
        assert_eq!(c.spool.max_bytes, 64 << 20);
        let c = load_text(&format!("{GOOD}[spool]\nmax_bytes = 8388608\n"), &[]).unwrap();
        assert_eq!(c.spool.max_bytes, 8 << 20);
        let c = load_text(GOOD, &[("DELEGATE_SPOOL__MAX_BYTES", "1g")]).unwrap();
        assert_eq!(c.spool.max_bytes, 1 << 30);
        let issues = issues_of(&format!("{GOOD}[spool]\nmax_bytes = 1024\n"), &[]);
        assert!(has(&issues, "spool.max_bytes", "at least"), "{issues:?}");
        let issues = issues_of(&format!("{GOOD}[spool]\nsize = 1\n"), &[]);
        assert!(issues.iter().any(|i| i.key == "spool.size"), "{issues:?}");
        // The spool key is not a setting, and not worth a warning either.
        let key = "ab".repeat(32);
        let c = load_text(GOOD, &[("DELEGATE_SPOOL_KEY", key.as_str())]).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn good_config_loads_with_resolved_paths_and_defaults() {
        let c = load_text(GOOD, &[]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/delegate/data"));
        assert_eq!(
            c.control_plane.ca_file,
            PathBuf::from("/etc/delegate/ca.pem")
        );
        assert_eq!(
            c.control_plane.key_file,
            PathBuf::from("/etc/delegate/agent.key")
        );
        assert_eq!(c.control_plane.endpoint.host, "127.0.0.1");
        assert_eq!(c.control_plane.endpoint.port, 8443);
        assert_eq!(c.control_plane.backoff_initial, Duration::from_millis(500));
        assert_eq!(c.control_plane.backoff_max, Duration::from_secs(30));
        assert_eq!(c.control_plane.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.agent.slots, 2);
        assert_eq!(c.sandbox.pull_policy, Some(PullPolicy::IfMissing));
        assert_eq!(c.sandbox.memory_bytes, None);
        assert_eq!(c.log.level, LogLevel::Info);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn every_key_of_the_documented_format_is_accepted() {
        // Keeps the serde shape and the documented keys in step: a key renamed in one place and
        // not the other fails here.
        let full = r#"
data_dir = "/var/lib/delegate"
[control_plane]
url = "wss://cp.example.com/v1/agent"
ca_file = "/etc/delegate/ca.pem"
cert_file = "/etc/delegate/agent.pem"
key_file = "/etc/delegate/agent.key"
spki_pin = "AB00000000000000000000000000000000000000000000000000000000000000"
backoff_initial_ms = 250
backoff_max_ms = 60000
connect_timeout_ms = 5000
[agent]
name = "vm-1"
pool = "prod"
slots = 4
labels = { os = "linux", zone = "a" }
drain_timeout = "2m"
[sandbox]
image = "registry.local/delegate-sandbox:1"
pull_policy = "never"
memory = "2g"
cpus = 1.5
pids = 512
timeout_default = "1h"
timeout_max = "4h"
cancel_grace = "10s"
max_archive_bytes = 1000
max_unpacked_bytes = 2000
max_files = 30
plugin_cache = false
labels = { "delegate.test-run" = "abc" }
[egress]
allow = ["registry.opentofu.org:443"]
deny = ["169.254.169.254/32"]
[log]
level = "debug"
format = "json"
"#;
        let c = load_text(full, &[]).unwrap();
        assert_eq!(c.control_plane.endpoint.port, 443);
        assert_eq!(c.control_plane.spki_pin.unwrap()[0], 0xab);
        assert_eq!(c.agent.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.agent.drain_timeout, Duration::from_secs(120));
        assert_eq!(c.sandbox.memory_bytes, Some(2 * 1024 * 1024 * 1024));
        assert_eq!(c.sandbox.nano_cpus, Some(1_500_000_000));
        assert_eq!(c.sandbox.pids_limit, Some(512));
        assert_eq!(c.sandbox.default_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.sandbox.max_timeout, Some(Duration::from_secs(4 * 3600)));
        assert_eq!(c.sandbox.cancel_grace, Some(Duration::from_secs(10)));
        assert_eq!(c.sandbox.max_files, Some(30));
        assert_eq!(c.sandbox.plugin_cache, Some(false));
        assert_eq!(
            c.sandbox
                .extra_labels
                .get("delegate.test-run")
                .map(String::as_str),
            Some("abc")
        );
        assert_eq!(
            c.egress.allow,
            vec!["registry.opentofu.org:443".to_string()]
        );
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_overrides_file_values() {
        let c = load_text(
            GOOD,
            &[
                ("DELEGATE_SANDBOX__IMAGE", "other:tag"),
                (
                    "DELEGATE_CONTROL_PLANE__URL",
                    "wss://cp.internal:9443/v1/agent",
                ),
                ("DELEGATE_DATA_DIR", "/srv/delegate"),
                ("DELEGATE_AGENT__SLOTS", "7"),
                ("DELEGATE_AGENT__LABELS__ZONE", "b"),
                ("DELEGATE_EGRESS__ALLOW", "a.example:443, b.example:443"),
                ("DELEGATE_LOG__FORMAT", "json"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.sandbox.image.as_deref(), Some("other:tag"));
        assert_eq!(c.control_plane.endpoint.host, "cp.internal");
        assert_eq!(c.control_plane.endpoint.port, 9443);
        assert_eq!(c.data_dir, PathBuf::from("/srv/delegate"));
        assert_eq!(c.agent.slots, 7);
        assert_eq!(c.agent.labels.get("zone").map(String::as_str), Some("b"));
        assert_eq!(c.egress.allow, vec!["a.example:443", "b.example:443"]);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_only_configuration_works() {
        let c = load_text(
            "",
            &[
                ("DELEGATE_DATA_DIR", "/data"),
                ("DELEGATE_CONTROL_PLANE__URL", "wss://cp:8443/v1/agent"),
                ("DELEGATE_CONTROL_PLANE__CA_FILE", "/certs/ca.pem"),
                ("DELEGATE_CONTROL_PLANE__CERT_FILE", "/certs/agent.pem"),
                ("DELEGATE_CONTROL_PLANE__KEY_FILE", "/certs/agent.key"),
                ("DELEGATE_AGENT__NAME", "sidecar"),
            ],
        )
        .unwrap();
        assert_eq!(c.agent.name, "sidecar");
        assert_eq!(c.agent.pool, "default");
        assert_eq!(c.agent.slots, 1);
    }

    #[test]
    fn foreign_top_level_variables_are_warnings() {
        let c = load_text(GOOD, &[("DELEGATE_CP_DATA_DIR", "/x")]).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("DELEGATE_CP_DATA_DIR"));
        // ...but a typo inside a section is an error even from the environment.
        let issues = issues_of(GOOD, &[("DELEGATE_SANDBOX__IMAGEE", "x")]);
        assert!(
            has(&issues, "sandbox.imagee", "unknown field"),
            "{issues:?}"
        );
    }

    #[test]
    fn bad_environment_value_is_reported_with_its_key_and_origin() {
        let issues = issues_of(GOOD, &[("DELEGATE_AGENT__SLOTS", "many")]);
        assert!(
            has(&issues, "agent.slots", "from the environment"),
            "{issues:?}"
        );
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_key() {
        let bad = r#"
colour = "blue"
[control_plane]
url = "http://127.0.0.1:8443/v1/agent"
ca_file = "ca.pem"
spki_pin = "xyz"
backoff_initial_ms = 1000
backoff_max_ms = 10
bogus = 1
[agent]
name = "bad name!"
slots = 0
extra = true
[sandbox]
pull_policy = "sometimes"
memory = "lots"
cpus = -1.0
pids = 0
timeout_default = "forever"
timeout_max = "1h"
cancel_grace = "soon"
max_files = 0
[egress]
allow = ["", "ok:443"]
deny = 5
[log]
level = "loud"
format = "xml"
"#;
        let issues = issues_of(bad, &[]);
        let expect = [
            ("colour", "unknown field"),
            ("data_dir", "missing"),
            (
                "control_plane.url",
                "only wss:// URLs are accepted, got http://127.0.0.1:8443/v1/agent",
            ),
            ("control_plane.cert_file", "missing"),
            ("control_plane.key_file", "missing"),
            ("control_plane.spki_pin", "64 hex"),
            (
                "control_plane.backoff_max_ms",
                "at least backoff_initial_ms",
            ),
            ("control_plane.bogus", "unknown field"),
            ("agent.name", "letters, digits"),
            ("agent.slots", "1..=1024"),
            ("agent.extra", "unknown field"),
            (
                "sandbox.pull_policy",
                "expected one of never | if-missing | always, got \"sometimes\"",
            ),
            ("sandbox.memory", "not a size"),
            ("sandbox.cpus", "number of CPUs"),
            ("sandbox.pids", "at least 1"),
            ("sandbox.timeout_default", "not a duration"),
            ("sandbox.cancel_grace", "not a duration"),
            ("sandbox.max_files", "at least 1"),
            ("egress.allow[0]", "empty"),
            ("egress.deny", "list of strings"),
            ("log.level", "expected one of error | warn"),
            ("log.format", "expected one of text | json"),
        ];
        for (key, needle) in expect {
            assert!(
                has(&issues, key, needle),
                "no issue for {key} ~ {needle}: {issues:#?}"
            );
        }
        assert_eq!(issues.len(), expect.len(), "{issues:#?}");
        // The error's display lists them all.
        let err = load_text(bad, &[]).unwrap_err().to_string();
        assert!(err.contains("22 errors"), "{err}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let issues = issues_of("[agent]\n", &[]);
        for key in [
            "data_dir",
            "control_plane.url",
            "control_plane.ca_file",
            "control_plane.cert_file",
            "control_plane.key_file",
            "agent.name",
        ] {
            assert!(has(&issues, key, "missing"), "{key}: {issues:?}");
        }
    }

    #[test]
    fn section_of_the_wrong_shape_is_named() {
        let issues = issues_of("data_dir = 'd'\nsandbox = 3\n", &[]);
        assert!(has(&issues, "sandbox", "must be a table"), "{issues:?}");
    }

    #[test]
    fn toml_syntax_error_is_a_read_error() {
        let err = load_text("data_dir = [", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_file_not_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, GOOD).unwrap();
        let c = load_with_env(&file, env(&[])).unwrap();
        assert_eq!(c.control_plane.ca_file, dir.path().join("ca.pem"));
        assert_eq!(c.data_dir, dir.path().join("data"));
    }

    #[test]
    fn one_line_error_lists_every_issue() {
        let e = load_text("[agent]\nslots = 0\n", &[])
            .unwrap_err()
            .one_line();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("agent.slots") && e.contains("data_dir"), "{e}");
    }

    #[test]
    fn missing_file_is_a_read_error_naming_it() {
        let err = load(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"), "{err}");
    }

    #[test]
    fn timeout_default_over_max_is_refused() {
        let text = format!("{GOOD}\n");
        let text = text.replace(
            "pull_policy = \"if-missing\"",
            "pull_policy = \"if-missing\"\ntimeout_default = \"5h\"\ntimeout_max = \"1h\"",
        );
        let issues = issues_of(&text, &[]);
        assert!(
            has(&issues, "sandbox.timeout_default", "must not exceed"),
            "{issues:?}"
        );
    }

    #[test]
    fn sandbox_settings_take_given_keys_and_defaults() {
        let text = GOOD.replace(
            "pull_policy = \"if-missing\"",
            "pull_policy = \"never\"\nmemory = \"1g\"\nlabels = { run = \"r1\" }",
        );
        let c = load_text(&text, &[]).unwrap();
        let s = c.sandbox_settings();
        let d = SandboxSettings::default();
        assert_eq!(s.image, "delegate-sandbox:local");
        assert_eq!(s.pull_policy, PullPolicy::Never);
        assert_eq!(s.memory_bytes, 1 << 30);
        assert_eq!(s.pids_limit, d.pids_limit);
        assert_eq!(s.default_timeout, d.default_timeout);
        assert_eq!(s.extra_labels.get("run").map(String::as_str), Some("r1"));
        assert_eq!(s.pool, "default");
    }

    #[test]
    fn timeout_default_over_the_default_max_is_refused() {
        let text = GOOD.replace(
            "pull_policy = \"if-missing\"",
            "pull_policy = \"if-missing\"\ntimeout_default = \"100h\"",
        );
        let issues = issues_of(&text, &[]);
        assert!(
            has(&issues, "sandbox.timeout_default", "must not exceed"),
            "{issues:?}"
        );
    }

    #[test]
    fn url_rules() {
        assert!(parse_wss_url("wss://h/v1/agent").is_ok());
        let e = parse_wss_url("wss://[::1]:9000/v1/agent").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
        assert!(parse_wss_url("ws://h/v1/agent")
            .unwrap_err()
            .contains("only wss://"));
        assert!(parse_wss_url("https://h/")
            .unwrap_err()
            .contains("only wss://"));
        let m = parse_wss_url("wss://user:hunter2@h/v1/agent").unwrap_err();
        assert!(!m.contains("hunter2"), "{m}");
        let m = parse_wss_url("http://user:hunter2@h/").unwrap_err();
        assert!(!m.contains("hunter2"), "{m}");
        assert!(parse_wss_url("not a url").is_err());
    }

    #[test]
    fn egress_entries_are_validated_naming_key_and_entry() {
        let base = GOOD.split("[egress]").next().unwrap();
        let text = format!(
            r#"{base}[egress]
allow = ["registry.opentofu.org:443", "10.20.0.0/16:5432", "*.com", "x:0"]
deny = ["ok.example", "10.0.0.1/8"]
max_connections = 0
firewall = "ufw"
[egress.hosts]
"mirror.internal" = "10.1.2.3"
"10.0.0.9" = "10.0.0.9"
"bad name" = "10.0.0.1"
"empty.example" = []
"twice.example" = ["10.0.0.1", "nope"]
"#
        );
        let issues = issues_of(&text, &[]);
        let expect = [
            (
                "egress.allow[2]",
                "\"*.com\": a wildcard over the public suffix \"com\"",
            ),
            ("egress.allow[3]", "\"x:0\": port"),
            ("egress.deny[1]", "\"10.0.0.1/8\": host bits are set"),
            ("egress.max_connections", "must be 1..=65536, got 0"),
            (
                "egress.firewall",
                "expected one of auto | nft | iptables | off",
            ),
            ("egress.hosts.\"10.0.0.9\"", "a host name, not an address"),
            ("egress.hosts.\"bad name\"", "not a valid host name"),
            ("egress.hosts.\"empty.example\"", "at least one address"),
            (
                "egress.hosts.\"twice.example\"[1]",
                "\"nope\" is not an IP address",
            ),
        ];
        for (key, needle) in expect {
            assert!(has(&issues, key, needle), "{key}: {needle}\n{issues:#?}");
        }
        assert_eq!(issues.len(), expect.len(), "{issues:#?}");
    }

    #[test]
    fn egress_settings_carry_the_parsed_policy() {
        let base = GOOD.split("[egress]").next().unwrap();
        let text = format!(
            r#"{base}[egress]
allow = ["registry.opentofu.org", "Mirror.Internal:8443"]
deny = ["10.0.0.0/8"]
max_connections = 32
firewall = "nft"
hosts = {{ "MIRROR.internal." = ["10.1.2.3", "fd00::3"] }}
"#
        );
        let c = load_text(&text, &[]).unwrap();
        let s = c.sandbox_settings().egress;
        let p = s.policy.current();
        let allow: Vec<String> = p.allow.iter().map(|r| r.to_string()).collect();
        assert_eq!(allow, ["registry.opentofu.org:443", "mirror.internal:8443"]);
        assert_eq!(p.deny[0].to_string(), "10.0.0.0/8");
        assert_eq!(s.max_connections, 32);
        assert_eq!(s.firewall, FirewallMode::Nft);
        assert_eq!(
            s.hosts.get("mirror.internal"),
            Some(&vec![
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "fd00::3".parse().unwrap()
            ])
        );
        // Defaults: nothing allowed, firewall detected, 256 connections.
        let c = load_text(base, &[]).unwrap();
        let s = c.egress_settings();
        assert!(s.policy.current().allows_nothing());
        assert_eq!(s.firewall, FirewallMode::Auto);
        assert_eq!(s.max_connections, 256);
        // From the environment too.
        let c = load_text(
            base,
            &[("DELEGATE_EGRESS__ALLOW", "a.example, b.example:8443")],
        )
        .unwrap();
        assert_eq!(c.egress_settings().policy.current().allow.len(), 2);
        let issues = issues_of(base, &[("DELEGATE_EGRESS__DENY", "*.co.uk")]);
        assert!(
            has(&issues, "egress.deny[0]", "public suffix"),
            "{issues:?}"
        );
    }

    #[test]
    fn metrics_listen_and_provider_mirrors() {
        let c = load_text(GOOD, &[]).unwrap();
        assert_eq!(c.metrics, None);
        assert_eq!(c.sandbox.provider_mirror, None);
        let text = format!(
            "{GOOD}\n[metrics]\nlisten = \"127.0.0.1:9464\"\n"
        )
        .replace(
            "pull_policy = \"if-missing\"",
            "pull_policy = \"if-missing\"\nprovider_mirror = \"https://mirror.internal:8443/providers\"",
        );
        let c = load_text(&text, &[]).unwrap();
        assert_eq!(
            c.metrics,
            Some(crate::metrics::MetricsListen::Tcp(
                "127.0.0.1:9464".parse().unwrap()
            ))
        );
        assert_eq!(
            c.sandbox.provider_mirror,
            Some(crate::mirror::ProviderMirror::Network(
                "https://mirror.internal:8443/providers/".into()
            ))
        );
        let c = load_text(
            GOOD,
            &[
                (
                    "DELEGATE_METRICS__LISTEN",
                    "unix:/run/delegate/metrics.sock",
                ),
                (
                    "DELEGATE_SANDBOX__PROVIDER_FILESYSTEM_MIRROR",
                    "/srv/providers",
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            c.metrics,
            Some(crate::metrics::MetricsListen::Unix(
                "/run/delegate/metrics.sock".into()
            ))
        );
        assert_eq!(
            c.sandbox.provider_mirror,
            Some(crate::mirror::ProviderMirror::Filesystem(
                "/srv/providers".into()
            ))
        );
        let issues = issues_of(
            GOOD,
            &[
                ("DELEGATE_METRICS__LISTEN", "0.0.0.0:9464"),
                ("DELEGATE_SANDBOX__PROVIDER_MIRROR", "http://mirror/"),
            ],
        );
        assert!(
            has(&issues, "metrics.listen", "not a loopback address"),
            "{issues:?}"
        );
        assert!(
            has(&issues, "sandbox.provider_mirror", "https://"),
            "{issues:?}"
        );
        let issues = issues_of(
            GOOD,
            &[
                ("DELEGATE_SANDBOX__PROVIDER_MIRROR", "https://m/"),
                ("DELEGATE_SANDBOX__PROVIDER_FILESYSTEM_MIRROR", "/srv/p"),
            ],
        );
        assert!(
            has(&issues, "sandbox.provider_filesystem_mirror", "not both"),
            "{issues:?}"
        );
        let issues = issues_of(GOOD, &[("DELEGATE_METRICS__PORT", "1")]);
        assert!(has(&issues, "metrics.port", "unknown field"), "{issues:?}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512m"), Ok(512 * 1024 * 1024));
        assert_eq!(parse_size("2G"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("1.5g"), Ok(1536 * 1024 * 1024));
        assert_eq!(parse_size("1048576"), Ok(1048576));
        assert_eq!(parse_size("64MiB"), Ok(64 * 1024 * 1024));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1x").is_err());
        assert!(parse_size("").is_err());
    }
}
