//! Host firewall rules the agent owns for one task network: a sandbox on that network's bridge
//! reaches the host only at the egress proxy and the state backend on the gateway IP, and nothing
//! is forwarded into or out of the bridge.
//!
//! Why they are needed even on an `internal: true` Docker network: the bridge's gateway IP is an
//! address of the host, so every host service listening on `0.0.0.0` answers a sandbox there, and
//! Docker's own rules only stop *forwarding*, not traffic addressed to the host (the INPUT path).
//!
//! Two renderings of the same rule set, both pure functions of [`Isolation`]:
//! - nftables (preferred): one table per bridge, `inet delegate_<bridge>`, hooked at input and
//!   forward with priority -10. Applied atomically with `nft -f -`, removed with one
//!   `nft delete table`. It does not depend on which iptables backend Docker uses.
//! - iptables (when `nft` is missing): a chain `DLG-<bridge>` jumped to from the top of INPUT
//!   (IPv4 and IPv6), plus two FORWARD rules at the top.
//!
//! Traffic refused is *rejected* (TCP reset, ICMP administratively prohibited), so a sandbox fails
//! fast with a clear error instead of hanging.
//!
//! With nftables, each distinct TCP/UDP destination (address, protocol, port) a sandbox tried,
//! on the host or beyond it, and was rejected for is also remembered in the sets `rejected4`/`rejected6`
//! (at most [`MAX_REJECTED`] each; past that, packets are still rejected, only not remembered), so
//! the agent can audit those attempts ([`rejected`]). The iptables rendering keeps no such record.
//!
//! [`apply`] and [`remove`] shell out to `nft` or `iptables`/`ip6tables`; they need root or
//! `CAP_NET_ADMIN` and say so plainly when they do not have it. [`remove`] is idempotent.

use std::net::IpAddr;
use std::process::Stdio;
use std::str::FromStr;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What to isolate: the task network's bridge on the host, and the ports the sandbox may reach on
/// its gateway IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The bridge interface name: the agent names its task networks' bridges `dlg` + 12 hex
    /// digits of the task id (Docker's `com.docker.network.bridge.name` option); Docker's own
    /// default would be `br-<network id prefix>`.
    pub bridge: String,
    /// The bridge's address on the host, where the proxy (and backend) listen.
    pub gateway: IpAddr,
    pub proxy_port: u16,
    /// The agent's state backend, when the task uses the default backend.
    pub backend_port: Option<u16>,
}

/// Most distinct rejected destinations remembered per bridge and address family.
pub const MAX_REJECTED: usize = 256;

/// A destination (on the host or beyond it) that a sandbox tried to reach directly and was
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejected {
    pub addr: IpAddr,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub port: u16,
}

/// Which tool applies the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Iptables,
}

/// Why rules could not be applied or removed.
#[derive(Debug, Error)]
pub enum FirewallError {
    /// Not retryable: the input is wrong.
    #[error("cannot isolate: {0}")]
    Invalid(String),
    /// Not retryable: the agent needs root or CAP_NET_ADMIN.
    #[error("{tool} is not permitted to change the firewall (the agent needs root or CAP_NET_ADMIN): {detail}")]
    NotPermitted { tool: &'static str, detail: String },
    /// Not retryable: install nftables or iptables.
    #[error("{0} is not installed")]
    Missing(&'static str),
    /// Possibly retryable (e.g. the xtables lock was held).
    #[error("`{command}` failed: {detail}")]
    Failed { command: String, detail: String },
}

impl Isolation {
    /// The bridge must be a plausible interface name: 1 to 15 of `[A-Za-z0-9_.-]`, so it can go
    /// into a command line and an nft script unquoted-safe.
    pub fn validate(&self) -> Result<(), FirewallError> {
        let ok_name = !self.bridge.is_empty()
            && self.bridge.len() <= 15
            && self
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok_name {
            return Err(FirewallError::Invalid(format!(
                "{:?} is not an interface name",
                self.bridge
            )));
        }
        if self.proxy_port == 0 || self.backend_port == Some(0) {
            return Err(FirewallError::Invalid("port 0".into()));
        }
        Ok(())
    }

    fn ports(&self) -> Vec<u16> {
        let mut p = vec![self.proxy_port];
        if let Some(b) = self.backend_port {
            if b != self.proxy_port {
                p.push(b);
            }
        }
        p
    }

    /// The nft table holding this bridge's rules.
    pub fn nft_table(&self) -> String {
        format!("delegate_{}", self.bridge.replace(['-', '.'], "_"))
    }

    /// The iptables chain holding this bridge's INPUT rules (at most 29 characters).
    pub fn iptables_chain(&self) -> String {
        format!("DLG-{}", self.bridge)
    }
}

/// The nft script that (re)creates this bridge's table atomically.
pub fn render_nft(iso: &Isolation) -> String {
    let table = iso.nft_table();
    let br = &iso.bridge;
    let family = match iso.gateway {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    };
    let ports: Vec<String> = iso.ports().iter().map(|p| p.to_string()).collect();
    format!(
        "table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tset rejected4 {{ type ipv4_addr . inet_proto . inet_service; size {MAX_REJECTED}; flags dynamic; }}\n\
         \tset rejected6 {{ type ipv6_addr . inet_proto . inet_service; size {MAX_REJECTED}; flags dynamic; }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10; policy accept;\n\
         \t\tiifname \"{br}\" {family} daddr {gw} tcp dport {{ {ports} }} accept\n\
         \t\tiifname \"{br}\" meta l4proto {{ tcp, udp }} add @rejected4 {{ ip daddr . meta l4proto . th dport }}\n\
         \t\tiifname \"{br}\" meta l4proto {{ tcp, udp }} add @rejected6 {{ ip6 daddr . meta l4proto . th dport }}\n\
         \t\tiifname \"{br}\" meta l4proto tcp reject with tcp reset\n\
         \t\tiifname \"{br}\" reject with icmpx type admin-prohibited\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority -10; policy accept;\n\
         \t\tiifname \"{br}\" oifname != \"{br}\" meta l4proto {{ tcp, udp }} add @rejected4 {{ ip daddr . meta l4proto . th dport }}\n\
         \t\tiifname \"{br}\" oifname != \"{br}\" meta l4proto {{ tcp, udp }} add @rejected6 {{ ip6 daddr . meta l4proto . th dport }}\n\
         \t\tiifname \"{br}\" oifname != \"{br}\" reject with icmpx type admin-prohibited\n\
         \t\toifname \"{br}\" iifname != \"{br}\" reject with icmpx type admin-prohibited\n\
         \t}}\n\
         }}\n",
        gw = iso.gateway,
        ports = ports.join(", "),
    )
}

/// The nft command that removes this bridge's table.
pub fn render_nft_remove(iso: &Isolation) -> Vec<String> {
    vec![
        "delete".into(),
        "table".into(),
        "inet".into(),
        iso.nft_table(),
    ]
}

/// The nft commands that list this bridge's remembered rejections (one per address family).
pub fn render_nft_list_rejected(iso: &Isolation) -> [Vec<String>; 2] {
    let table = iso.nft_table();
    ["rejected4", "rejected6"].map(|set| {
        ["-j", "list", "set", "inet", &table, set]
            .iter()
            .map(|s| s.to_string())
            .collect()
    })
}

/// The elements of `nft -j list set` output. Anything unexpected is skipped, never a panic.
pub fn parse_nft_rejected(json: &str) -> Vec<Rejected> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in v["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for elem in item["set"]["elem"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            // Plain `{"concat": [...]}`, or wrapped as `{"elem": {"val": {"concat": [...]}}}`.
            let concat = elem
                .get("concat")
                .or_else(|| elem.pointer("/elem/val/concat"));
            let Some([addr, proto, port]) = concat.and_then(|c| c.as_array()).map(Vec::as_slice)
            else {
                continue;
            };
            let addr = addr.as_str().and_then(|a| IpAddr::from_str(a).ok());
            let protocol = proto.as_str().filter(|p| matches!(*p, "tcp" | "udp"));
            let port = port.as_u64().and_then(|p| u16::try_from(p).ok());
            if let (Some(addr), Some(protocol), Some(port)) = (addr, protocol, port) {
                out.push(Rejected {
                    addr,
                    protocol: protocol.to_string(),
                    port,
                });
            }
        }
    }
    out.sort();
    out
}

/// `(tool, args)` commands that install the rules with iptables, in order.
pub fn render_iptables(iso: &Isolation) -> Vec<(&'static str, Vec<String>)> {
    let chain = iso.iptables_chain();
    let br = iso.bridge.clone();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let (same, other, prohibited) = match iso.gateway {
        IpAddr::V4(_) => ("iptables", "ip6tables", "icmp-admin-prohibited"),
        IpAddr::V6(_) => ("ip6tables", "iptables", "icmp6-adm-prohibited"),
    };
    let other_prohibited = if other == "iptables" {
        "icmp-admin-prohibited"
    } else {
        "icmp6-adm-prohibited"
    };
    let mut cmds = vec![(same, s(&["-w", "-N", &chain]))];
    for p in iso.ports() {
        let d = iso.gateway.to_string();
        cmds.push((
            same,
            s(&[
                "-w",
                "-A",
                &chain,
                "-d",
                &d,
                "-p",
                "tcp",
                "--dport",
                &p.to_string(),
                "-j",
                "ACCEPT",
            ]),
        ));
    }
    cmds.push((
        same,
        s(&[
            "-w",
            "-A",
            &chain,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]),
    ));
    cmds.push((
        same,
        s(&[
            "-w",
            "-A",
            &chain,
            "-j",
            "REJECT",
            "--reject-with",
            prohibited,
        ]),
    ));
    cmds.push((
        same,
        s(&["-w", "-I", "INPUT", "1", "-i", &br, "-j", &chain]),
    ));
    // The other address family reaches nothing on the host from this bridge.
    cmds.push((other, s(&["-w", "-N", &chain])));
    cmds.push((
        other,
        s(&[
            "-w",
            "-A",
            &chain,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]),
    ));
    cmds.push((
        other,
        s(&[
            "-w",
            "-A",
            &chain,
            "-j",
            "REJECT",
            "--reject-with",
            other_prohibited,
        ]),
    ));
    cmds.push((
        other,
        s(&["-w", "-I", "INPUT", "1", "-i", &br, "-j", &chain]),
    ));
    for (tool, p) in [(same, prohibited), (other, other_prohibited)] {
        cmds.push((
            tool,
            s(&[
                "-w",
                "-I",
                "FORWARD",
                "1",
                "-i",
                &br,
                "!",
                "-o",
                &br,
                "-j",
                "REJECT",
                "--reject-with",
                p,
            ]),
        ));
        cmds.push((
            tool,
            s(&[
                "-w",
                "-I",
                "FORWARD",
                "1",
                "-o",
                &br,
                "!",
                "-i",
                &br,
                "-j",
                "REJECT",
                "--reject-with",
                p,
            ]),
        ));
    }
    cmds
}

/// `(tool, args)` commands that remove what [`render_iptables`] installed; each may fail harmlessly
/// when already gone.
pub fn render_iptables_remove(iso: &Isolation) -> Vec<(&'static str, Vec<String>)> {
    let chain = iso.iptables_chain();
    let br = iso.bridge.clone();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let mut cmds = Vec::new();
    for (tool, p) in [
        ("iptables", "icmp-admin-prohibited"),
        ("ip6tables", "icmp6-adm-prohibited"),
    ] {
        cmds.push((tool, s(&["-w", "-D", "INPUT", "-i", &br, "-j", &chain])));
        cmds.push((tool, s(&["-w", "-F", &chain])));
        cmds.push((tool, s(&["-w", "-X", &chain])));
        cmds.push((
            tool,
            s(&[
                "-w",
                "-D",
                "FORWARD",
                "-i",
                &br,
                "!",
                "-o",
                &br,
                "-j",
                "REJECT",
                "--reject-with",
                p,
            ]),
        ));
        cmds.push((
            tool,
            s(&[
                "-w",
                "-D",
                "FORWARD",
                "-o",
                &br,
                "!",
                "-i",
                &br,
                "-j",
                "REJECT",
                "--reject-with",
                p,
            ]),
        ));
    }
    cmds
}

/// The backend this host supports: nft if it runs, else iptables, else `None`.
pub async fn detect() -> Option<Backend> {
    for (tool, backend) in [("nft", Backend::Nft), ("iptables", Backend::Iptables)] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(backend);
        }
    }
    None
}

/// Whether this process may change the firewall with `backend` (a harmless listing): fails with
/// [`FirewallError::NotPermitted`] without root or `CAP_NET_ADMIN`, [`FirewallError::Missing`]
/// without the tool.
pub async fn check(backend: Backend) -> Result<(), FirewallError> {
    let (tool, args): (&'static str, &[&str]) = match backend {
        Backend::Nft => ("nft", &["list", "tables"]),
        Backend::Iptables => ("iptables", &["-w", "-n", "-L", "INPUT"]),
    };
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    run(tool, &args, None).await.map(drop)
}

/// Install the rules (replacing this bridge's rules if present).
pub async fn apply(backend: Backend, iso: &Isolation) -> Result<(), FirewallError> {
    iso.validate()?;
    match backend {
        Backend::Nft => run("nft", &["-f".into(), "-".into()], Some(render_nft(iso)))
            .await
            .map(drop),
        Backend::Iptables => {
            // Start clean so a re-apply does not stack duplicate rules.
            remove(Backend::Iptables, iso).await?;
            for (tool, args) in render_iptables(iso) {
                run(tool, &args, None).await?;
            }
            Ok(())
        }
    }
}

/// Remove the rules; succeeds when they are already gone.
pub async fn remove(backend: Backend, iso: &Isolation) -> Result<(), FirewallError> {
    iso.validate()?;
    match backend {
        Backend::Nft => match run("nft", &render_nft_remove(iso), None).await {
            Err(FirewallError::Failed { detail, .. })
                if detail.contains("No such file or directory") =>
            {
                Ok(())
            }
            other => other.map(drop),
        },
        Backend::Iptables => {
            for (tool, args) in render_iptables_remove(iso) {
                match run(tool, &args, None).await {
                    Ok(_) | Err(FirewallError::Failed { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }
}

/// The destinations a sandbox on this bridge tried to reach directly, on the host or beyond it,
/// and was refused (nft only: with iptables the list is always empty).
pub async fn rejected(backend: Backend, iso: &Isolation) -> Result<Vec<Rejected>, FirewallError> {
    iso.validate()?;
    if backend == Backend::Iptables {
        return Ok(Vec::new());
    }
    let mut all = Vec::new();
    for args in render_nft_list_rejected(iso) {
        all.extend(parse_nft_rejected(&run("nft", &args, None).await?));
    }
    all.sort();
    Ok(all)
}

/// Run a firewall tool (feeding it `stdin`); its stdout on success. Denied by the kernel (no root
/// or `CAP_NET_ADMIN`) is [`FirewallError::NotPermitted`].
async fn run(
    tool: &'static str,
    args: &[String],
    stdin: Option<String>,
) -> Result<String, FirewallError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FirewallError::Missing(tool),
        std::io::ErrorKind::PermissionDenied => FirewallError::NotPermitted {
            tool,
            detail: e.to_string(),
        },
        _ => FirewallError::Failed {
            command: tool.into(),
            detail: e.to_string(),
        },
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| FirewallError::Failed {
                command: tool.into(),
                detail: e.to_string(),
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| FirewallError::Failed {
            command: tool.into(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let detail = String::from_utf8_lossy(&out.stderr)
        .trim()
        .chars()
        .take(500)
        .collect::<String>();
    let lower = detail.to_ascii_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        return Err(FirewallError::NotPermitted { tool, detail });
    }
    Err(FirewallError::Failed {
        command: format!("{tool} {}", args.join(" ")),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso() -> Isolation {
        Isolation {
            bridge: "br-0123456789ab".into(),
            gateway: "172.30.0.1".parse().unwrap(),
            proxy_port: 3128,
            backend_port: Some(8081),
        }
    }

    #[test]
    fn renders_the_nft_table() {
        let script = render_nft(&iso());
        let want = "table inet delegate_br_0123456789ab
delete table inet delegate_br_0123456789ab
table inet delegate_br_0123456789ab {
\tset rejected4 { type ipv4_addr . inet_proto . inet_service; size 256; flags dynamic; }
\tset rejected6 { type ipv6_addr . inet_proto . inet_service; size 256; flags dynamic; }
\tchain input {
\t\ttype filter hook input priority -10; policy accept;
\t\tiifname \"br-0123456789ab\" ip daddr 172.30.0.1 tcp dport { 3128, 8081 } accept
\t\tiifname \"br-0123456789ab\" meta l4proto { tcp, udp } add @rejected4 { ip daddr . meta l4proto . th dport }
\t\tiifname \"br-0123456789ab\" meta l4proto { tcp, udp } add @rejected6 { ip6 daddr . meta l4proto . th dport }
\t\tiifname \"br-0123456789ab\" meta l4proto tcp reject with tcp reset
\t\tiifname \"br-0123456789ab\" reject with icmpx type admin-prohibited
\t}
\tchain forward {
\t\ttype filter hook forward priority -10; policy accept;
\t\tiifname \"br-0123456789ab\" oifname != \"br-0123456789ab\" meta l4proto { tcp, udp } add @rejected4 { ip daddr . meta l4proto . th dport }
\t\tiifname \"br-0123456789ab\" oifname != \"br-0123456789ab\" meta l4proto { tcp, udp } add @rejected6 { ip6 daddr . meta l4proto . th dport }
\t\tiifname \"br-0123456789ab\" oifname != \"br-0123456789ab\" reject with icmpx type admin-prohibited
\t\toifname \"br-0123456789ab\" iifname != \"br-0123456789ab\" reject with icmpx type admin-prohibited
\t}
}
";
        assert_eq!(script, want);
        assert_eq!(
            render_nft_remove(&iso()),
            ["delete", "table", "inet", "delegate_br_0123456789ab"]
        );
    }

    #[test]
    fn renders_ipv6_gateways_and_a_lone_proxy_port() {
        let v6 = Isolation {
            gateway: "fd00:1::1".parse().unwrap(),
            backend_port: None,
            ..iso()
        };
        let script = render_nft(&v6);
        assert!(
            script.contains("ip6 daddr fd00:1::1 tcp dport { 3128 } accept"),
            "{script}"
        );
        let cmds = render_iptables(&v6);
        assert!(cmds
            .iter()
            .any(|(t, a)| *t == "ip6tables" && a.contains(&"--dport".to_string())));
        assert!(!cmds
            .iter()
            .any(|(t, a)| *t == "iptables" && a.contains(&"--dport".to_string())));
    }

    #[test]
    fn renders_iptables_commands() {
        let cmds: Vec<String> = render_iptables(&iso())
            .iter()
            .map(|(t, a)| format!("{t} {}", a.join(" ")))
            .collect();
        let want = [
            "iptables -w -N DLG-br-0123456789ab",
            "iptables -w -A DLG-br-0123456789ab -d 172.30.0.1 -p tcp --dport 3128 -j ACCEPT",
            "iptables -w -A DLG-br-0123456789ab -d 172.30.0.1 -p tcp --dport 8081 -j ACCEPT",
            "iptables -w -A DLG-br-0123456789ab -p tcp -j REJECT --reject-with tcp-reset",
            "iptables -w -A DLG-br-0123456789ab -j REJECT --reject-with icmp-admin-prohibited",
            "iptables -w -I INPUT 1 -i br-0123456789ab -j DLG-br-0123456789ab",
            "ip6tables -w -N DLG-br-0123456789ab",
            "ip6tables -w -A DLG-br-0123456789ab -p tcp -j REJECT --reject-with tcp-reset",
            "ip6tables -w -A DLG-br-0123456789ab -j REJECT --reject-with icmp6-adm-prohibited",
            "ip6tables -w -I INPUT 1 -i br-0123456789ab -j DLG-br-0123456789ab",
            "iptables -w -I FORWARD 1 -i br-0123456789ab ! -o br-0123456789ab -j REJECT --reject-with icmp-admin-prohibited",
            "iptables -w -I FORWARD 1 -o br-0123456789ab ! -i br-0123456789ab -j REJECT --reject-with icmp-admin-prohibited",
            "ip6tables -w -I FORWARD 1 -i br-0123456789ab ! -o br-0123456789ab -j REJECT --reject-with icmp6-adm-prohibited",
            "ip6tables -w -I FORWARD 1 -o br-0123456789ab ! -i br-0123456789ab -j REJECT --reject-with icmp6-adm-prohibited",
        ];
        assert_eq!(cmds, want);
        let removes = render_iptables_remove(&iso());
        assert_eq!(removes.len(), 10);
        assert!(removes.iter().all(|(_, a)| a.contains(&"-D".to_string())
            || a.contains(&"-F".to_string())
            || a.contains(&"-X".to_string())));
    }

    #[test]
    fn parses_remembered_rejections() {
        // As nft 1.0.6 prints it.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"set": {"family": "inet", "name": "rejected4", "table": "delegate_br_x",
             "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 2, "size": 256,
             "elem": [{"concat": ["172.18.0.1", "udp", 53]}, {"concat": ["172.18.0.1", "tcp", 8080]},
                      {"elem": {"val": {"concat": ["172.18.0.1", "tcp", 22]}, "expires": 1}},
                      {"concat": ["not an address", "tcp", 1]}, {"concat": ["172.18.0.1", "sctp", 1]},
                      {"concat": ["172.18.0.1", "tcp", 70000]}, {"concat": ["172.18.0.1"]}, 7]}}]}"#;
        let got: Vec<String> = parse_nft_rejected(json)
            .iter()
            .map(|r| format!("{} {} {}", r.addr, r.protocol, r.port))
            .collect();
        assert_eq!(
            got,
            [
                "172.18.0.1 tcp 22",
                "172.18.0.1 tcp 8080",
                "172.18.0.1 udp 53"
            ]
        );
        assert!(parse_nft_rejected("").is_empty());
        assert!(parse_nft_rejected("{\"nftables\": 5}").is_empty());
        assert!(parse_nft_rejected("{\"nftables\": [{\"set\": {}}]}").is_empty());
        let cmds = render_nft_list_rejected(&iso());
        assert_eq!(
            cmds[0].join(" "),
            "-j list set inet delegate_br_0123456789ab rejected4"
        );
        assert_eq!(
            cmds[1].join(" "),
            "-j list set inet delegate_br_0123456789ab rejected6"
        );
    }

    #[test]
    fn refuses_names_that_could_inject() {
        for bad in ["", "br-0123456789abc", "br x", "br;rm", "br\"", "br\n"] {
            let i = Isolation {
                bridge: bad.into(),
                ..iso()
            };
            assert!(
                matches!(i.validate(), Err(FirewallError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(Isolation {
            proxy_port: 0,
            ..iso()
        }
        .validate()
        .is_err());
        assert!(iso().validate().is_ok());
    }
}
