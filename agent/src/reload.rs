//! SIGHUP: re-read the configuration file and apply what can change without dropping the
//! connection or any task: the client certificate, key and CA (used by the next connection), the
//! log level, and the egress policy's `allow`/`deny` rules (through a hook the binary installs over
//! the sandbox's policy handle; tasks started afterwards get the new rules, running ones keep
//! theirs). The other `[egress]` keys (`hosts`, `max_connections`, `firewall`) need a restart.
//!
//! Owns the decision of what a new configuration changes ([`plan`], pure) and applying it
//! ([`Reloader::reload`]). Everything else that changed is reported as needing a restart; nothing
//! is half-applied: a configuration that does not validate, or certificate files that do not make
//! a working TLS configuration, leave everything as it was.
//!
//! Must never: drop the current connection or a task, or apply a configuration that failed
//! validation.

use crate::config::{self, Config, EgressConfig, LogLevel};
use crate::tls::{self, TlsHandle};
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// Why a reload was refused as a whole. The running configuration stays; retry after fixing.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(String),
}

/// Applies a new log level; installed by the binary over its tracing subscriber.
pub type LogLevelHook = Arc<dyn Fn(LogLevel) -> Result<(), String> + Send + Sync>;
/// Applies a new egress policy (`allow`/`deny`, parsed in [`EgressConfig::policy`]); installed by
/// the binary over the sandbox's policy handle. Returns an error to keep the old one.
pub type EgressHook = Arc<dyn Fn(&EgressConfig) -> Result<(), String> + Send + Sync>;

/// What a new configuration changes (the certificate files are re-read on every reload: their
/// content may have changed on disk while the configuration did not).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadPlan {
    pub log_level: Option<LogLevel>,
    /// `egress.allow`/`egress.deny` changed (applied live through the egress hook).
    pub egress: bool,
    /// Keys whose change takes effect only after a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Compare the running and the new configuration.
pub fn plan(old: &Config, new: &Config) -> ReloadPlan {
    let mut p = ReloadPlan::default();
    if old.log.level != new.log.level {
        p.log_level = Some(new.log.level);
    }
    let (oe, ne) = (&old.egress, &new.egress);
    if oe.allow != ne.allow || oe.deny != ne.deny || oe.policy != ne.policy {
        p.egress = true;
    }
    let (o, n) = (&old.control_plane, &new.control_plane);
    let mut restart = |key: &'static str, changed: bool| {
        if changed {
            p.restart_needed.push(key);
        }
    };
    restart("data_dir", old.data_dir != new.data_dir);
    restart("control_plane.url", o.endpoint != n.endpoint);
    restart(
        "control_plane.ca_file/cert_file/key_file (paths)",
        o.ca_file != n.ca_file || o.cert_file != n.cert_file || o.key_file != n.key_file,
    );
    restart("control_plane.spki_pin", o.spki_pin != n.spki_pin);
    restart(
        "control_plane.backoff/connect_timeout",
        o.backoff_initial != n.backoff_initial
            || o.backoff_max != n.backoff_max
            || o.connect_timeout != n.connect_timeout,
    );
    restart(
        "agent",
        format!("{:?}", old.agent) != format!("{:?}", new.agent),
    );
    restart("sandbox", old.sandbox != new.sandbox);
    // The sandbox holds these in its settings, not behind a handle.
    restart(
        "egress.hosts/max_connections/firewall",
        oe.hosts != ne.hosts
            || oe.max_connections != ne.max_connections
            || oe.firewall != ne.firewall,
    );
    restart("log.format", old.log.format != new.log.format);
    restart("metrics", old.metrics != new.metrics);
    p
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub applied: Vec<String>,
    pub restart_needed: Vec<String>,
    /// Parts that could not be applied (the old setting stays for each).
    pub errors: Vec<String>,
}

impl ReloadReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// One line for logs and the service manager's status.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.applied.is_empty() {
            parts.push(format!("reloaded {}", self.applied.join(", ")));
        }
        if !self.errors.is_empty() {
            parts.push(format!("not reloaded: {}", self.errors.join("; ")));
        }
        if !self.restart_needed.is_empty() {
            parts.push(format!(
                "changed but applied only after a restart: {}",
                self.restart_needed.join(", ")
            ));
        }
        if parts.is_empty() {
            "reloaded; nothing changed".into()
        } else {
            parts.join("; ")
        }
    }
}

/// Holds the running configuration and the handles a reload updates.
pub struct Reloader {
    path: PathBuf,
    current: Config,
    tls: TlsHandle,
    log_level: Option<LogLevelHook>,
    egress: Option<EgressHook>,
}

impl Reloader {
    pub fn new(current: Config, tls: TlsHandle) -> Reloader {
        Reloader {
            path: current.file.clone(),
            current,
            tls,
            log_level: None,
            egress: None,
        }
    }

    pub fn with_log_level_hook(mut self, hook: LogLevelHook) -> Reloader {
        self.log_level = Some(hook);
        self
    }

    /// The egress side's swap: called with the new `[egress]` section on reload.
    pub fn with_egress_hook(mut self, hook: EgressHook) -> Reloader {
        self.egress = Some(hook);
        self
    }

    pub fn current(&self) -> &Config {
        &self.current
    }

    /// Re-read the file at the path the running configuration came from and apply it.
    pub fn reload(&mut self) -> Result<ReloadReport, ReloadError> {
        let new = config::load(&self.path).map_err(|e| ReloadError::Config(e.one_line()))?;
        Ok(self.apply(new))
    }

    /// Apply an already loaded configuration.
    pub fn apply(&mut self, new: Config) -> ReloadReport {
        let plan = plan(&self.current, &new);
        let mut report = ReloadReport {
            restart_needed: plan.restart_needed.iter().map(|s| s.to_string()).collect(),
            ..ReloadReport::default()
        };
        // Certificates: from the running paths (a path change needs a restart, see plan).
        let cp = &self.current.control_plane;
        match tls::client_config(&cp.ca_file, &cp.cert_file, &cp.key_file, cp.spki_pin) {
            Ok(c) => {
                self.tls.replace(c);
                report
                    .applied
                    .push("certificates (used by the next connection)".into());
            }
            Err(e) => report.errors.push(format!("certificates: {e}")),
        }
        let mut applied = self.current.clone();
        if let Some(level) = plan.log_level {
            match &self.log_level {
                Some(hook) => match hook(level) {
                    Ok(()) => {
                        report.applied.push(format!("log level {}", level.as_str()));
                        applied.log.level = level;
                    }
                    Err(e) => report.errors.push(format!("log level: {e}")),
                },
                None => report.restart_needed.push("log.level".into()),
            }
        }
        if plan.egress {
            match &self.egress {
                Some(hook) => match hook(&new.egress) {
                    Ok(()) => {
                        report.applied.push("egress policy".into());
                        // Only the rules: the rest of [egress] waits for a restart (see plan).
                        applied.egress.allow = new.egress.allow.clone();
                        applied.egress.deny = new.egress.deny.clone();
                        applied.egress.policy = new.egress.policy.clone();
                    }
                    Err(e) => report.errors.push(format!("egress policy: {e}")),
                },
                None => report.restart_needed.push("egress".into()),
            }
        }
        // What was not applied stays as it runs, so the next reload compares against the truth.
        self.current = applied;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Mutex;

    const BASE: &str = r#"
data_dir = "data"
[control_plane]
url = "wss://127.0.0.1:8443/v1/agent"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[agent]
name = "runner-1"
[log]
level = "info"
"#;

    fn cfg(text: &str, dir: &Path) -> Config {
        config::load_str(text, &dir.join("agent.toml"), dir, Some(Default::default())).unwrap()
    }

    #[test]
    fn plan_separates_live_changes_from_restarts() {
        let d = Path::new("/etc/delegate");
        let old = cfg(BASE, d);
        let same = plan(&old, &old);
        assert_eq!(same.log_level, None);
        assert!(!same.egress);
        assert!(same.restart_needed.is_empty());

        let new = cfg(
            &BASE
                .replace("level = \"info\"", "level = \"debug\"")
                .replace("[log]", "[egress]\nallow = [\"a.example:443\"]\n[log]"),
            d,
        );
        let p = plan(&old, &new);
        assert_eq!(p.log_level, Some(LogLevel::Debug));
        assert!(p.egress);
        assert!(p.restart_needed.is_empty(), "{:?}", p.restart_needed);

        // The rest of [egress] lives in the sandbox's settings: a restart, not a live change.
        let new = cfg(
            &BASE.replace(
                "[log]",
                "[egress]\nfirewall = \"off\"\n[egress.hosts]\n\"m.example\" = \"10.0.0.1\"\n[log]",
            ),
            d,
        );
        let p = plan(&old, &new);
        assert!(!p.egress);
        assert_eq!(
            p.restart_needed,
            vec!["egress.hosts/max_connections/firewall"]
        );

        let new = cfg(
            &BASE
                .replace("runner-1", "runner-2")
                .replace("8443", "9443")
                .replace("agent.pem", "other.pem"),
            d,
        );
        let p = plan(&old, &new);
        assert_eq!(
            p.restart_needed,
            vec![
                "control_plane.url",
                "control_plane.ca_file/cert_file/key_file (paths)",
                "agent"
            ]
        );
    }

    fn pki(dir: &Path) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["runner-1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("agent.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("agent.key"), key.serialize_pem()).unwrap();
    }

    #[test]
    fn reload_applies_hooks_and_keeps_old_settings_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, BASE).unwrap();
        let old = config::load(&file).unwrap();
        let tls = TlsHandle::new(
            tls::client_config(
                &old.control_plane.ca_file,
                &old.control_plane.cert_file,
                &old.control_plane.key_file,
                None,
            )
            .unwrap(),
        );
        let levels = Arc::new(Mutex::new(Vec::new()));
        let seen = levels.clone();
        let egress_ok = Arc::new(Mutex::new(true));
        let gate = egress_ok.clone();
        let mut r = Reloader::new(old, tls.clone())
            .with_log_level_hook(Arc::new(move |l| {
                seen.lock().unwrap().push(l);
                Ok(())
            }))
            .with_egress_hook(Arc::new(move |_| {
                if *gate.lock().unwrap() {
                    Ok(())
                } else {
                    Err("bad rule".into())
                }
            }));

        // New certificate files and a new level: applied, TLS swapped.
        let before = tls.current();
        pki(dir.path());
        std::fs::write(&file, BASE.replace("\"info\"", "\"debug\"")).unwrap();
        let rep = r.reload().unwrap();
        assert!(rep.ok(), "{rep:?}");
        assert_eq!(*levels.lock().unwrap(), vec![LogLevel::Debug]);
        assert!(!Arc::ptr_eq(&before, &tls.current()));
        assert!(
            rep.summary().contains("log level debug"),
            "{}",
            rep.summary()
        );

        // An invalid file: refused as a whole, nothing changes.
        let before = tls.current();
        std::fs::write(&file, "data_dir = [").unwrap();
        let e = r.reload().unwrap_err();
        assert!(e.to_string().contains("agent.toml"), "{e}");
        assert!(Arc::ptr_eq(&before, &tls.current()));

        // A broken key file: the certificates are not swapped, the rest still applies.
        std::fs::write(
            &file,
            BASE.replace("[log]", "[egress]\nallow = [\"x.example:443\"]\n[log]"),
        )
        .unwrap();
        std::fs::write(dir.path().join("agent.key"), "nope").unwrap();
        let rep = r.reload().unwrap();
        assert!(!rep.ok());
        assert!(rep.errors[0].starts_with("certificates:"), "{rep:?}");
        assert!(
            rep.applied.contains(&"egress policy".to_string()),
            "{rep:?}"
        );
        assert!(Arc::ptr_eq(&before, &tls.current()));
        // Back to info, with a failing egress hook: the level applies, egress stays old.
        *egress_ok.lock().unwrap() = false;
        std::fs::write(
            &file,
            BASE.replace("[log]", "[egress]\nallow = [\"y.example:443\"]\n[log]"),
        )
        .unwrap();
        let rep = r.reload().unwrap();
        assert!(rep.errors.iter().any(|e| e.contains("bad rule")), "{rep:?}");
        assert_eq!(r.current().egress.allow, vec!["x.example:443"]);
        assert_eq!(r.current().log.level, LogLevel::Info);
        // New rules together with a restart-only egress key: the rules apply, the key waits.
        *egress_ok.lock().unwrap() = true;
        std::fs::write(
            &file,
            BASE.replace(
                "[log]",
                "[egress]\nallow = [\"z.example:443\"]\nmax_connections = 7\n[log]",
            ),
        )
        .unwrap();
        let rep = r.reload().unwrap();
        assert!(
            rep.applied.contains(&"egress policy".to_string()),
            "{rep:?}"
        );
        assert_eq!(
            rep.restart_needed,
            vec!["egress.hosts/max_connections/firewall"]
        );
        assert_eq!(r.current().egress.allow, vec!["z.example:443"]);
        assert_eq!(r.current().egress.max_connections, None);
        // A restart-only change is reported, not applied.
        std::fs::write(&file, BASE.replace("runner-1", "runner-9")).unwrap();
        let rep = r.reload().unwrap();
        assert!(rep.restart_needed.contains(&"agent".to_string()), "{rep:?}");
        assert_eq!(r.current().agent.name, "runner-1");
    }
}
