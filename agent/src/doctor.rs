//! `delegate doctor`: checks a host the way an operator would before starting (or when
//! troubleshooting) the agent, one line per check with a fix hint.
//!
//! Checks: the configuration, permissions of the key (no group/other access) and of `data_dir`
//! (0700), the certificate (validity, days left, key match, CA), the control plane (TCP, TLS 1.3
//! with the client certificate, WebSocket, protocol version — through [`crate::link::probe`],
//! which never takes over a running agent's connection), the Docker API and its version, the
//! sandbox image, free space in `data_dir`, the egress configuration (rules parse; a network
//! provider mirror is on the allowlist), and the egress host firewall (the same detection and
//! read-only listing the agent's start-up check runs, `nft list tables` or `iptables -L INPUT`, so
//! a host without nft/iptables or without `CAP_NET_ADMIN` is caught before every task is refused).
//!
//! The decisions are plain functions over what was observed ([`check_key_mode`],
//! [`check_data_dir_mode`], [`check_certificate`], [`check_free_space`], [`check_egress`],
//! [`check_firewall`], ...); the async edges only gather the facts. Doctor never changes anything
//! on the host, never pulls an image, and never prints key material.

use crate::config::{self, Config};
use crate::egress::firewall::{Backend, FirewallError};
use crate::link::{self, LinkError};
use crate::sandbox::egress_wiring::{self, EgressError, FirewallMode};
use crate::tls;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub level: Level,
    pub check: &'static str,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            level: Level::Ok,
            check,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Warn,
            check,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Fail,
            check,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// `ok|warn|FAIL  check  detail  (fix: hint)`, one line per check.
pub fn render_text(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<4}  {:<width$}  {}",
            c.level.word(),
            c.check,
            c.detail.replace('\n', " ")
        ));
        if let Some(f) = &c.fix {
            out.push_str(&format!("  (fix: {f})"));
        }
        out.push('\n');
    }
    out
}

pub fn render_json(checks: &[Check]) -> String {
    serde_json::to_string_pretty(checks).unwrap_or_else(|_| "[]".into())
}

/// Whether any check failed (the command exits non-zero).
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.level == Level::Fail)
}

/// The private key file's mode and owner.
pub fn check_key_mode(path: &Path, mode: u32, owner: u32, me: u32) -> Check {
    let shown = path.display();
    if mode & 0o077 != 0 {
        return Check::fail(
            "key permissions",
            format!(
                "{shown} is mode {:04o}: group or others can read the private key",
                mode & 0o7777
            ),
            format!("chmod 600 {shown}"),
        );
    }
    if owner != me {
        return Check::warn(
            "key permissions",
            format!(
                "{shown} is mode {:04o} but owned by uid {owner}, not the agent's uid {me}",
                mode & 0o7777
            ),
            format!("chown the key to the user the agent runs as (e.g. chown delegate {shown})"),
        );
    }
    Check::ok(
        "key permissions",
        format!("{shown} is mode {:04o}", mode & 0o7777),
    )
}

/// `data_dir`'s mode, or its absence.
pub fn check_data_dir_mode(path: &Path, mode: Option<u32>) -> Check {
    let shown = path.display();
    match mode {
        None => Check::warn(
            "data_dir permissions",
            format!("{shown} does not exist yet; the agent creates it (0700) at start"),
            "make sure its parent is writable by the agent's user",
        ),
        Some(m) if m & 0o077 != 0 => Check::fail(
            "data_dir permissions",
            format!(
                "{shown} is mode {:04o}: the spool and keys must be private to the agent",
                m & 0o7777
            ),
            format!("chmod 700 {shown}"),
        ),
        Some(m) => Check::ok(
            "data_dir permissions",
            format!("{shown} is mode {:04o}", m & 0o7777),
        ),
    }
}

/// Validity and days left of a certificate valid from `not_before` to `not_after`.
pub fn check_certificate(
    path: &Path,
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
) -> Check {
    let shown = path.display();
    let until = humantime::format_rfc3339_seconds(not_after);
    if now < not_before {
        return Check::fail(
            "certificate",
            format!(
                "{shown} is not valid before {}",
                humantime::format_rfc3339_seconds(not_before)
            ),
            "check the host's clock (NTP)",
        );
    }
    let Ok(left) = not_after.duration_since(now) else {
        return Check::fail(
            "certificate",
            format!("{shown} expired at {until}"),
            "enroll again: delegate enroll --url ... --token ... --ca-sha256 ... --out DIR",
        );
    };
    let days = left.as_secs() / 86400;
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let detail = format!(
        "{shown} valid until {until} ({days} day(s), {}h left)",
        left.as_secs() / 3600
    );
    if left < life / 3 {
        return Check::warn(
            "certificate",
            format!("{detail}; past two thirds of its life"),
            "the agent renews it over the link once connected; if it keeps failing, see the agent's log or enroll again",
        );
    }
    Check::ok("certificate", detail)
}

/// Free space in `data_dir`'s file system.
pub fn check_free_space(path: &Path, free: u64) -> Check {
    const FAIL_BELOW: u64 = 256 << 20;
    const WARN_BELOW: u64 = 2 << 30;
    let shown = path.display();
    let mib = free >> 20;
    if free < FAIL_BELOW {
        Check::fail(
            "disk space",
            format!("{mib} MiB free for {shown}; the spool may fill it"),
            "free space or move data_dir to a larger file system (at least 2 GiB recommended)",
        )
    } else if free < WARN_BELOW {
        Check::warn(
            "disk space",
            format!("{mib} MiB free for {shown}"),
            "at least 2 GiB is recommended for the spool and workspace archives",
        )
    } else {
        Check::ok("disk space", format!("{} GiB free for {shown}", free >> 30))
    }
}

/// The egress policy, and the provider mirror against it.
pub fn check_egress(cfg: &Config) -> Check {
    // The rules themselves were validated with the configuration.
    let policy = &cfg.egress.policy;
    if let Some(crate::mirror::ProviderMirror::Network(url)) = &cfg.sandbox.provider_mirror {
        if let Some((host, port)) = crate::mirror::mirror_destination(url) {
            if crate::egress::matcher::check_name(policy, &host, port).is_err() {
                return Check::fail(
                    "egress",
                    format!("the provider mirror {host}:{port} is not allowed by [egress]"),
                    format!("add \"{host}:{port}\" to [egress] allow"),
                );
            }
        }
    }
    if policy.allows_nothing() {
        return Check::ok(
            "egress",
            format!(
                "no destination allowed ({} deny rule(s)): sandboxes reach nothing outside",
                policy.deny.len()
            ),
        );
    }
    Check::ok(
        "egress",
        format!(
            "{} allow and {} deny rule(s)",
            policy.allow.len(),
            policy.deny.len()
        ),
    )
}

/// The egress host firewall: `found` is what the agent's start-up check
/// ([`egress_wiring::firewall_backend`]) gives for `mode` in this process, run as `uid`.
pub fn check_firewall(
    mode: FirewallMode,
    found: &Result<Option<Backend>, EgressError>,
    uid: u32,
) -> Check {
    const NAME: &str = "egress firewall";
    let how = match mode {
        FirewallMode::Auto => "detected",
        _ => "egress.firewall",
    };
    let privileges = "run the agent as root, or as its own user with CAP_NET_ADMIN and AF_NETLINK \
        as systemd/delegate.service grants them (AmbientCapabilities=CAP_NET_ADMIN, \
        RestrictAddressFamilies=... AF_NETLINK); doctor checks with its own privileges, so run it \
        the way the agent runs. Or set [egress] firewall = \"off\" if the task bridges (dlg*) are \
        isolated from the host some other way";
    let install =
        "install nftables (e.g. apt-get install nftables), or set [egress] firewall = \"off\" \
        if the task bridges (dlg*) are isolated from the host some other way";
    match found {
        Ok(None) => Check::warn(
            NAME,
            "off (egress.firewall = \"off\"): the agent installs no host firewall rules for its task \
             bridges, so a sandbox can reach every service listening on this host's addresses \
             (sshd, databases, published ports, the agent's metrics) and whatever the host routes \
             to; the egress proxy enforces the allowlist only for traffic sent through it",
            "keep it off only where the task bridges (dlg*) are isolated another way (e.g. \
             packaging/k8s/node-firewall.nft on the node); otherwise remove egress.firewall and \
             install nftables",
        ),
        Ok(Some(Backend::Nft)) => Check::ok(
            NAME,
            format!(
                "nft ({how}) may change the firewall: each task bridge dlg… gets a table \
                 inet delegate_dlg…, and rejected attempts are audited"
            ),
        ),
        Ok(Some(Backend::Iptables)) => Check::ok(
            NAME,
            format!(
                "iptables ({how}) may change the firewall: each task bridge dlg… gets a chain \
                 DLG-dlg… (rejected attempts are not audited; nft would)"
            ),
        ),
        Err(EgressError::NoFirewall) => Check::fail(
            NAME,
            "neither nft nor iptables runs on this host: the agent starts, but its start-up \
             firewall check fails and every task is refused",
            install,
        ),
        Err(EgressError::Firewall(FirewallError::Missing(tool))) => Check::fail(
            NAME,
            format!(
                "egress.firewall = \"{}\" but {tool} is not installed: every task would be refused",
                mode.as_str()
            ),
            if *tool == "nft" {
                install.to_string()
            } else {
                format!("install {tool}, or leave egress.firewall at \"auto\" with nftables installed")
            },
        ),
        Err(EgressError::Firewall(FirewallError::NotPermitted { tool, detail })) => Check::fail(
            NAME,
            format!(
                "{tool} is not permitted to change the firewall as uid {uid} (no root or \
                 CAP_NET_ADMIN): every task would be refused ({detail})"
            ),
            privileges,
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{e}: every task would be refused"),
            privileges,
        ),
    }
}

/// A failed control plane probe, with the likely fix.
pub fn check_probe_error(url: &str, e: &LinkError) -> Check {
    let detail = format!("{url}: {e}");
    let fix = match e {
        LinkError::Connect { .. } | LinkError::Timeout(_) => {
            "check control_plane.url, DNS and that outbound TCP to the control plane is allowed by the firewall"
        }
        LinkError::Tls { reason, .. } if reason.contains("UnknownIssuer") || reason.contains("issuer") => {
            "control_plane.ca_file is not the CA that signed the control plane's certificate"
        }
        LinkError::Tls { reason, .. } if reason.contains("spki_pin") => {
            "control_plane.spki_pin does not match the control plane's key (rotated?)"
        }
        LinkError::Tls { reason, .. } if reason.contains("NotValidForName") || reason.contains("name") => {
            "the host in control_plane.url is not a name in the control plane's certificate"
        }
        LinkError::Tls { .. } => "check the certificate files and that the control plane speaks TLS 1.3",
        LinkError::Upgrade(m) if m.contains("alert") || m.contains("certificate") => {
            "the control plane refused this agent's certificate (revoked, expired or from another CA): enroll again"
        }
        LinkError::Upgrade(_) => "check the path of control_plane.url (e.g. /v1/agent)",
        LinkError::Refused { code, .. } if code == "unauthorized" => {
            "the control plane refused this agent (revoked?): enroll again with a new token"
        }
        _ => "see the control plane's log for this agent",
    };
    Check::fail("control plane", detail, fix)
}

/// Everything, in order. Network and Docker checks use `timeout` each.
pub async fn run(config_path: &Path, timeout: Duration) -> Vec<Check> {
    let mut checks = Vec::new();
    let cfg = match config::load(config_path) {
        Ok(c) => {
            let mut detail = format!("{} is valid", config_path.display());
            if !c.warnings.is_empty() {
                detail.push_str(&format!(" ({})", c.warnings.join("; ")));
            }
            checks.push(Check::ok("config", detail));
            c
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.one_line(),
                format!(
                    "edit {}; `delegate config check --config {}` lists every error",
                    config_path.display(),
                    config_path.display()
                ),
            ));
            return checks;
        }
    };
    checks.extend(files(&cfg));
    checks.push(control_plane(&cfg, timeout).await);
    checks.extend(docker(&cfg, timeout).await);
    checks.push(disk(&cfg));
    checks.push(check_egress(&cfg));
    checks.push(firewall(&cfg, timeout).await);
    checks
}

fn files(cfg: &Config) -> Vec<Check> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let cp = &cfg.control_plane;
    let me = rustix::process::geteuid().as_raw();
    match std::fs::metadata(&cp.key_file) {
        Ok(m) => out.push(check_key_mode(&cp.key_file, m.mode(), m.uid(), me)),
        Err(e) => out.push(Check::fail(
            "key permissions",
            format!("{}: {e}", cp.key_file.display()),
            "check control_plane.key_file, or enroll to create it",
        )),
    }
    let dd = std::fs::metadata(&cfg.data_dir).ok().map(|m| m.mode());
    out.push(check_data_dir_mode(&cfg.data_dir, dd));
    let issues = cfg.check_files();
    if !issues.is_empty() {
        let list: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
        out.push(Check::fail(
            "certificate",
            list.join("; "),
            "check the files named; enroll again if the certificate expired or does not match the key",
        ));
        return out;
    }
    match tls::load_cert_chain(&cp.cert_file)
        .map_err(|e| e.to_string())
        .and_then(|c| tls::cert_validity(&c[0]))
    {
        Ok(v) => out.push(check_certificate(
            &cp.cert_file,
            v.not_before,
            v.not_after,
            SystemTime::now(),
        )),
        Err(e) => out.push(Check::fail(
            "certificate",
            e,
            "check control_plane.cert_file",
        )),
    }
    out
}

async fn control_plane(cfg: &Config, timeout: Duration) -> Check {
    let cp = &cfg.control_plane;
    let tls = match tls::client_config(&cp.ca_file, &cp.cert_file, &cp.key_file, cp.spki_pin) {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                "control plane",
                format!("not tried: {e}"),
                "fix the certificate files first",
            )
        }
    };
    let url = &cp.endpoint.url;
    match tokio::time::timeout(timeout, link::probe(&cp.endpoint, tls, &cfg.agent.name)).await {
        Err(_) => check_probe_error(url, &LinkError::Timeout(timeout)),
        Ok(Err(e)) => check_probe_error(url, &e),
        Ok(Ok(r)) => match r.negotiated {
            Some(v) => Check::ok(
                "control plane",
                format!("{url}: TLS 1.3, client certificate accepted, protocol v{v} (it speaks {:?}, this agent {:?})", r.versions, delegate_protocol::SUPPORTED_VERSIONS),
            ),
            None => Check::fail(
                "control plane",
                format!("{url}: reachable, but it speaks protocol versions {:?} and this agent {:?}", r.versions, delegate_protocol::SUPPORTED_VERSIONS),
                "upgrade the agent or the control plane so that they share a protocol version",
            ),
        },
    }
}

async fn docker(cfg: &Config, timeout: Duration) -> Vec<Check> {
    let settings = cfg.sandbox_settings();
    let hint =
        "is dockerd running, and is the agent's user in the docker group (or DOCKER_HOST right)?";
    let connected = tokio::time::timeout(timeout, async {
        let d = bollard::Docker::connect_with_local_defaults()?;
        let d = d.negotiate_version().await?;
        let v = d.version().await?;
        Ok::<_, bollard::errors::Error>((d, v))
    })
    .await;
    let (docker, version) = match connected {
        Err(_) => {
            return vec![
                Check::fail(
                    "docker",
                    format!(
                        "no answer from the Docker API within {}",
                        humantime::format_duration(timeout)
                    ),
                    hint,
                ),
                Check::fail(
                    "sandbox image",
                    format!("{}: not checked (no Docker)", settings.image),
                    hint,
                ),
            ]
        }
        Ok(Err(e)) => {
            return vec![
                Check::fail("docker", format!("cannot use the Docker API: {e}"), hint),
                Check::fail(
                    "sandbox image",
                    format!("{}: not checked (no Docker)", settings.image),
                    hint,
                ),
            ]
        }
        Ok(Ok(x)) => x,
    };
    let mut out = vec![Check::ok(
        "docker",
        format!(
            "Docker {} (API {})",
            version.version.as_deref().unwrap_or("?"),
            version.api_version.as_deref().unwrap_or("?")
        ),
    )];
    let image = &settings.image;
    match tokio::time::timeout(timeout, docker.inspect_image(image)).await {
        Ok(Ok(i)) => out.push(Check::ok(
            "sandbox image",
            format!(
                "{image} present ({}, {} MiB)",
                i.id.as_deref()
                    .unwrap_or("?")
                    .chars()
                    .take(19)
                    .collect::<String>(),
                i.size.unwrap_or(0) >> 20
            ),
        )),
        Ok(Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        })) => {
            let fix = format!("docker load -i <images.tar>, or delegate sandbox build-image --from-binary $(command -v tofu) --tag {image}");
            out.push(match settings.pull_policy {
                crate::sandbox::PullPolicy::Never => Check::fail(
                    "sandbox image",
                    format!("{image} is not present and sandbox.pull_policy is \"never\""),
                    fix,
                ),
                p => Check::warn(
                    "sandbox image",
                    format!("{image} is not present; the agent will pull it at start (pull_policy \"{}\")", p.as_str()),
                    format!("in an air-gapped pool: {fix}"),
                ),
            });
        }
        Ok(Err(e)) => out.push(Check::fail("sandbox image", format!("{image}: {e}"), hint)),
        Err(_) => out.push(Check::fail(
            "sandbox image",
            format!("{image}: no answer"),
            hint,
        )),
    }
    out
}

/// The agent's own start-up check: detect the backend, then a read-only listing (`nft list
/// tables`, `iptables -w -n -L INPUT`) that needs the privileges rules would need.
async fn firewall(cfg: &Config, timeout: Duration) -> Check {
    let mode = cfg.egress.firewall;
    let found = tokio::time::timeout(timeout, egress_wiring::firewall_backend(mode))
        .await
        .unwrap_or_else(|_| {
            Err(EgressError::Firewall(FirewallError::Failed {
                command: "nft/iptables".into(),
                detail: format!("no answer within {}", humantime::format_duration(timeout)),
            }))
        });
    check_firewall(mode, &found, rustix::process::geteuid().as_raw())
}

fn disk(cfg: &Config) -> Check {
    // data_dir may not exist yet: measure the nearest existing ancestor.
    let mut p = cfg.data_dir.as_path();
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    match rustix::fs::statvfs(p) {
        Ok(s) => check_free_space(&cfg.data_dir, s.f_bavail.saturating_mul(s.f_frsize)),
        Err(e) => Check::warn(
            "disk space",
            format!(
                "cannot measure free space for {}: {e}",
                cfg.data_dir.display()
            ),
            "check that data_dir's file system is mounted",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn key_modes() {
        let k = PathBuf::from("/etc/delegate/agent.key");
        assert_eq!(check_key_mode(&k, 0o100600, 5, 5).level, Level::Ok);
        assert_eq!(check_key_mode(&k, 0o100400, 5, 5).level, Level::Ok);
        let c = check_key_mode(&k, 0o100644, 5, 5);
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("0644"), "{c:?}");
        assert_eq!(c.fix.as_deref(), Some("chmod 600 /etc/delegate/agent.key"));
        assert_eq!(check_key_mode(&k, 0o100640, 5, 5).level, Level::Fail);
        assert_eq!(check_key_mode(&k, 0o100600, 0, 5).level, Level::Warn);
    }

    #[test]
    fn data_dir_modes() {
        let d = PathBuf::from("/var/lib/delegate");
        assert_eq!(check_data_dir_mode(&d, Some(0o40700)).level, Level::Ok);
        let c = check_data_dir_mode(&d, Some(0o40755));
        assert_eq!(c.level, Level::Fail);
        assert_eq!(c.fix.as_deref(), Some("chmod 700 /var/lib/delegate"));
        assert_eq!(check_data_dir_mode(&d, None).level, Level::Warn);
    }

    #[test]
    fn certificate_windows() {
        let p = PathBuf::from("agent.pem");
        let day = 86400;
        let c = check_certificate(&p, t(0), t(30 * day), t(day));
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.contains("29 day(s)"), "{c:?}");
        assert_eq!(
            check_certificate(&p, t(0), t(30 * day), t(25 * day)).level,
            Level::Warn
        );
        let c = check_certificate(&p, t(0), t(30 * day), t(31 * day));
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("expired"));
        let c = check_certificate(&p, t(10 * day), t(30 * day), t(day));
        assert_eq!(c.level, Level::Fail);
        assert!(c.fix.unwrap().contains("clock"));
    }

    #[test]
    fn free_space() {
        let d = PathBuf::from("/var/lib/delegate");
        assert_eq!(check_free_space(&d, 100 << 30).level, Level::Ok);
        assert_eq!(check_free_space(&d, 1 << 30).level, Level::Warn);
        assert_eq!(check_free_space(&d, 10 << 20).level, Level::Fail);
    }

    #[test]
    fn firewall_findings() {
        let off = check_firewall(FirewallMode::Off, &Ok(None), 0);
        assert_eq!(off.level, Level::Warn);
        assert!(
            off.detail.contains("off") && off.detail.contains("sshd"),
            "{off:?}"
        );
        assert!(off.fix.unwrap().contains("isolated another way"));

        let nft = check_firewall(FirewallMode::Auto, &Ok(Some(Backend::Nft)), 0);
        assert_eq!(nft.level, Level::Ok);
        assert!(nft.detail.contains("delegate_dlg"), "{nft:?}");
        let ipt = check_firewall(FirewallMode::Iptables, &Ok(Some(Backend::Iptables)), 0);
        assert_eq!(ipt.level, Level::Ok);
        assert!(ipt.detail.contains("egress.firewall"), "{ipt:?}");

        let none = check_firewall(FirewallMode::Auto, &Err(EgressError::NoFirewall), 998);
        assert_eq!(none.level, Level::Fail);
        assert!(none.detail.contains("every task"), "{none:?}");
        let fix = none.fix.unwrap();
        assert!(fix.contains("install nftables") && fix.contains("firewall = \"off\""));

        let missing = check_firewall(
            FirewallMode::Nft,
            &Err(EgressError::Firewall(FirewallError::Missing("nft"))),
            998,
        );
        assert_eq!(missing.level, Level::Fail);
        assert!(
            missing.detail.contains("nft is not installed"),
            "{missing:?}"
        );
        assert!(missing.fix.unwrap().contains("install nftables"));

        let denied = check_firewall(
            FirewallMode::Auto,
            &Err(EgressError::Firewall(FirewallError::NotPermitted {
                tool: "nft",
                detail: "Operation not permitted".into(),
            })),
            998,
        );
        assert_eq!(denied.level, Level::Fail);
        assert!(denied.detail.contains("uid 998"), "{denied:?}");
        let fix = denied.fix.unwrap();
        assert!(
            fix.contains("root") && fix.contains("CAP_NET_ADMIN") && fix.contains("AF_NETLINK"),
            "{fix}"
        );

        let failed = check_firewall(
            FirewallMode::Auto,
            &Err(EgressError::Firewall(FirewallError::Failed {
                command: "nft list tables".into(),
                detail: "cannot open netlink socket".into(),
            })),
            998,
        );
        assert_eq!(failed.level, Level::Fail);
        assert!(failed.detail.contains("netlink"), "{failed:?}");
        assert!(failed.fix.unwrap().contains("AF_NETLINK"));
    }

    #[test]
    fn probe_errors_get_specific_hints() {
        let url = "wss://cp:8443/v1/agent";
        let c = check_probe_error(
            url,
            &LinkError::Connect {
                addr: "cp:8443".into(),
                reason: "refused".into(),
            },
        );
        assert!(c.fix.unwrap().contains("firewall"));
        let c = check_probe_error(
            url,
            &LinkError::Tls {
                addr: "cp:8443".into(),
                reason: "invalid peer certificate: UnknownIssuer".into(),
            },
        );
        assert!(c.fix.unwrap().contains("ca_file"));
        let c = check_probe_error(
            url,
            &LinkError::Refused {
                code: "unauthorized".into(),
                message: "revoked".into(),
            },
        );
        assert!(c.fix.unwrap().contains("enroll again"));
        assert_eq!(c.level, Level::Fail);
    }

    #[test]
    fn rendering() {
        let checks = vec![
            Check::ok("config", "fine"),
            Check::fail("key permissions", "too open", "chmod 600 k"),
        ];
        let text = render_text(&checks);
        assert_eq!(
            text,
            "ok    config           fine\nFAIL  key permissions  too open  (fix: chmod 600 k)\n"
        );
        assert!(any_failed(&checks));
        let v: serde_json::Value = serde_json::from_str(&render_json(&checks)).unwrap();
        assert_eq!(v[1]["level"], "fail");
        assert_eq!(v[1]["fix"], "chmod 600 k");
        assert!(v[0].get("fix").is_none());
    }
}
