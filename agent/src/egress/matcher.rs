//! The egress decision: may this task reach (host as asked, port), given the addresses the proxy
//! resolved for it?
//!
//! - The host is normalised first ([`normalize_host`]): lower case, one trailing dot dropped, IDNA
//!   to ASCII (A-labels), IPv4-mapped IPv6 (`::ffff:a.b.c.d`) read as the IPv4 address it is.
//!   Numeric names that resolvers would read as addresses (`2130706433`, `0x7f.1`) are refused.
//! - An IP literal matches network (CIDR) rules only; a host name matches name rules only
//!   ([`check_name`] decides that before any DNS query, so a sandbox cannot make the agent resolve
//!   names that no rule could allow — no DNS exfiltration through the proxy). A network rule never
//!   lets a name through because of where it resolves.
//! - Then every address (the literal, or every resolved address) must pass the address check: not
//!   covered by a deny rule, and not in a refused range — loopback, link-local (with the cloud
//!   metadata addresses), unspecified, multicast, broadcast and reserved ranges, the same ranges
//!   embedded in IPv4-compatible, NAT64 (`64:ff9b::/96`) and 6to4 addresses, Teredo, and the
//!   caller's protected networks (the Docker bridge subnets and the host's own addresses) — unless
//!   an allow network rule *explicitly* covers it. Explicit means the rule's network lies inside
//!   every refused range the address is in: `127.0.0.1/32` opens loopback's 127.0.0.1,
//!   `169.254.169.254/32` opens the metadata address, but `0.0.0.0/0` opens neither.
//!
//! This module is pure: no I/O, no DNS, no logging.

use super::rules::{Cidr, Policy, Rule};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use thiserror::Error;

/// Longest host text looked at; longer input is refused before any IDNA work.
const MAX_HOST_INPUT: usize = 1024;

/// A normalised destination host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// Lower-case ASCII (A-label) host name, no trailing dot.
    Name(String),
    /// An address literal; IPv4-mapped IPv6 is given as IPv4.
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why a host text is not a usable host. Not retryable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("the host is too long")]
    TooLong,
    #[error("{0}")]
    Invalid(&'static str),
    #[error("a numeric host name is refused (it would be read as an address)")]
    Numeric,
}

/// Normalise a host as asked by a client or written in a rule.
pub fn normalize_host(raw: &str) -> Result<Host, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if raw.len() > MAX_HOST_INPUT {
        return Err(HostError::TooLong);
    }
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(HostError::Invalid("missing \"]\""))?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|v6| Host::Ip(canonical_ip(IpAddr::V6(v6))))
            .map_err(|_| HostError::Invalid("not an IPv6 address inside brackets"));
    }
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(Host::Ip(canonical_ip(ip)));
    }
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    let ascii = idna::domain_to_ascii_cow(trimmed.as_bytes(), idna::AsciiDenyList::URL)
        .map_err(|_| HostError::Invalid("not a valid host name"))?;
    if let Ok(v4) = ascii.parse::<Ipv4Addr>() {
        // Only reachable through IDNA mapping (e.g. full-width digits): still an address.
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    if ascii.is_empty() {
        return Err(HostError::Empty);
    }
    if ascii.len() > 253 {
        return Err(HostError::TooLong);
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(HostError::Invalid("the host has an empty label"));
        }
        if label.len() > 63 {
            return Err(HostError::Invalid(
                "a label of the host is longer than 63 characters",
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(HostError::Invalid(
                "the host has characters a DNS name cannot have",
            ));
        }
    }
    let last = ascii.rsplit('.').next().unwrap_or("");
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if last.bytes().all(|b| b.is_ascii_digit()) || hex {
        return Err(HostError::Numeric);
    }
    Ok(Host::Name(ascii.into_owned()))
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they map (a socket connects to exactly that).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `rule` (canonical text); the proxy may connect only to `addrs`, all checked.
    Allowed {
        rule: String,
        addrs: Vec<IpAddr>,
    },
    Denied(Denial),
}

/// Why a destination is denied. Its text is what the client and the audit trail see.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Denial {
    #[error("{host}:{port} is not in the egress allowlist")]
    NotListed { host: String, port: u16 },
    #[error("{host}:{port} is denied by the rule {rule}")]
    DeniedByRule {
        host: String,
        port: u16,
        rule: String,
    },
    #[error("an IP address is allowed only by a network rule, and none covers {addr} port {port}")]
    NoNetworkRule { addr: IpAddr, port: u16 },
    #[error("address {addr} is denied by the rule {rule}")]
    AddressDenied { addr: IpAddr, rule: String },
    #[error("address {addr} is {what} ({range}); only a network rule inside {range} allows it")]
    Refused {
        addr: IpAddr,
        range: Cidr,
        what: String,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
}

/// The name rule that allows `name:port` (deny rules checked first), before any DNS lookup.
pub fn check_name<'p>(policy: &'p Policy, name: &str, port: u16) -> Result<&'p Rule, Denial> {
    if let Some(d) = policy.deny.iter().find(|r| r.matches_name(name, port)) {
        return Err(Denial::DeniedByRule {
            host: name.to_string(),
            port,
            rule: d.to_string(),
        });
    }
    policy
        .allow
        .iter()
        .find(|r| r.matches_name(name, port))
        .ok_or_else(|| Denial::NotListed {
            host: name.to_string(),
            port,
        })
}

/// Decide for `host:port`; `resolved` are the addresses the proxy resolved for a name (ignored for
/// an IP literal). `protected` are networks refused unless explicitly allowed (Docker bridge
/// subnets, the host's own addresses).
pub fn decide(
    policy: &Policy,
    host: &Host,
    port: u16,
    resolved: &[IpAddr],
    protected: &[Cidr],
) -> Decision {
    match decide_inner(policy, host, port, resolved, protected) {
        Ok((rule, addrs)) => Decision::Allowed { rule, addrs },
        Err(d) => Decision::Denied(d),
    }
}

fn decide_inner(
    policy: &Policy,
    host: &Host,
    port: u16,
    resolved: &[IpAddr],
    protected: &[Cidr],
) -> Result<(String, Vec<IpAddr>), Denial> {
    match host {
        Host::Name(name) => {
            let rule = check_name(policy, name, port)?;
            if resolved.is_empty() {
                return Err(Denial::NoAddress { host: name.clone() });
            }
            let mut addrs = Vec::with_capacity(resolved.len());
            for ip in resolved {
                let ip = canonical_ip(*ip);
                check_address(policy, ip, port, protected)?;
                if !addrs.contains(&ip) {
                    addrs.push(ip);
                }
            }
            Ok((rule.to_string(), addrs))
        }
        Host::Ip(ip) => {
            let ip = canonical_ip(*ip);
            if let Some(d) = policy.deny.iter().find(|r| r.matches_addr(&ip, port)) {
                return Err(Denial::DeniedByRule {
                    host: Host::Ip(ip).to_string(),
                    port,
                    rule: d.to_string(),
                });
            }
            let mut candidates: Vec<&Rule> = policy
                .allow
                .iter()
                .filter(|r| r.matches_addr(&ip, port))
                .collect();
            if candidates.is_empty() {
                return Err(Denial::NoNetworkRule { addr: ip, port });
            }
            // Most specific first, so the audit names the narrowest rule that allowed it.
            candidates.sort_by_key(|r| std::cmp::Reverse(r.net().map(|n| n.prefix()).unwrap_or(0)));
            let refused = refusals(&ip, protected);
            if refused.is_empty() {
                return Ok((candidates[0].to_string(), vec![ip]));
            }
            match candidates.iter().find(|r| explicitly_allows(r, &refused)) {
                Some(r) => Ok((r.to_string(), vec![ip])),
                None => Err(refused_denial(ip, &refused)),
            }
        }
    }
}

/// The address check a resolved address must pass.
fn check_address(policy: &Policy, ip: IpAddr, port: u16, protected: &[Cidr]) -> Result<(), Denial> {
    if let Some(d) = policy.deny.iter().find(|r| r.matches_addr(&ip, port)) {
        return Err(Denial::AddressDenied {
            addr: ip,
            rule: d.to_string(),
        });
    }
    let refused = refusals(&ip, protected);
    if refused.is_empty()
        || policy
            .allow
            .iter()
            .any(|r| r.matches_addr(&ip, port) && explicitly_allows(r, &refused))
    {
        Ok(())
    } else {
        Err(refused_denial(ip, &refused))
    }
}

fn explicitly_allows(rule: &Rule, refused: &[(Cidr, String)]) -> bool {
    rule.net()
        .is_some_and(|n| refused.iter().all(|(range, _)| range.contains_net(n)))
}

fn refused_denial(ip: IpAddr, refused: &[(Cidr, String)]) -> Denial {
    let (range, what) = refused[0].clone();
    Denial::Refused {
        addr: ip,
        range,
        what,
    }
}

/// Built-in IPv4 ranges refused unless explicitly allowed; specific entries first so the reason
/// names the most telling one.
const REFUSED_V4: &[([u8; 4], u8, &str)] = &[
    ([169, 254, 169, 254], 32, "the cloud metadata address"),
    ([168, 63, 129, 16], 32, "the Azure platform address"),
    (
        [100, 100, 100, 200],
        32,
        "the Alibaba Cloud metadata address",
    ),
    ([255, 255, 255, 255], 32, "the broadcast address"),
    ([0, 0, 0, 0], 8, "unspecified (this network)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

/// Built-in IPv6 ranges refused unless explicitly allowed (IPv4-embedding forms are handled by
/// mapping the IPv4 table into them).
const REFUSED_V6: &[(u128, u8, &str)] = &[
    (0, 128, "unspecified"),
    (1, 128, "loopback"),
    (
        0xfd00_0ec2_0000_0000_0000_0000_0000_0254,
        128,
        "the cloud metadata address (AWS IPv6)",
    ),
    (0xfe80 << 112, 10, "link-local"),
    (0xfec0 << 112, 10, "site-local (deprecated)"),
    (0xff00 << 112, 8, "multicast"),
    (0x2001_0000 << 96, 32, "a Teredo tunnel address"),
];

fn v4_refusals(v4: Ipv4Addr, protected: &[Cidr]) -> Vec<(Cidr, String)> {
    let ip = IpAddr::V4(v4);
    let mut out: Vec<(Cidr, String)> = REFUSED_V4
        .iter()
        .map(|(a, p, what)| (Cidr::truncating(IpAddr::V4(Ipv4Addr::from(*a)), *p), *what))
        .filter(|(c, _)| c.contains(&ip))
        .map(|(c, w)| (c, w.to_string()))
        .collect();
    out.extend(protected.iter().filter(|c| c.contains(&ip)).map(|c| {
        (
            *c,
            "a protected network (the agent's host or a Docker network)".to_string(),
        )
    }));
    out
}

/// The refused ranges `ip` lies in (empty: the address is an ordinary one).
pub fn refusals(ip: &IpAddr, protected: &[Cidr]) -> Vec<(Cidr, String)> {
    match canonical_ip(*ip) {
        IpAddr::V4(v4) => v4_refusals(v4, protected),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let ip6 = IpAddr::V6(v6);
            let mut out: Vec<(Cidr, String)> = REFUSED_V6
                .iter()
                .map(|(a, p, what)| (Cidr::truncating(IpAddr::V6(Ipv6Addr::from(*a)), *p), *what))
                .filter(|(c, _)| c.contains(&ip6))
                .map(|(c, w)| (c, w.to_string()))
                .collect();
            out.extend(protected.iter().filter(|c| c.contains(&ip6)).map(|c| {
                (
                    *c,
                    "a protected network (the agent's host or a Docker network)".to_string(),
                )
            }));
            // IPv4 embedded in IPv6: (prefix bits, prefix length, where the IPv4 sits, form name).
            let forms: [(u128, u8, u32, &str); 3] = [
                (0, 96, 0, "IPv4-compatible"),
                (0x0064_ff9b << 96, 96, 0, "NAT64"),
                (0x2002 << 112, 16, 80, "6to4"),
            ];
            for (prefix_bits, plen, shift, form) in forms {
                let outer = Cidr::truncating(IpAddr::V6(Ipv6Addr::from(prefix_bits)), plen);
                if !outer.contains(&ip6) {
                    continue;
                }
                let v4 = Ipv4Addr::from(((bits >> shift) & 0xffff_ffff) as u32);
                for (c4, what) in v4_refusals(v4, protected) {
                    let net4 = match c4.addr() {
                        IpAddr::V4(a) => u128::from(u32::from(a)),
                        IpAddr::V6(_) => continue,
                    };
                    let range = Cidr::truncating(
                        IpAddr::V6(Ipv6Addr::from(prefix_bits | (net4 << shift))),
                        plen + c4.prefix(),
                    );
                    out.push((range, format!("{what}, embedded in a {form} address")));
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Policy::parse(&s(allow), &s(deny)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn normalises_hosts() {
        let names = [
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("münchen.de.", "xn--mnchen-3ya.de"),
            ("a_b.example", "a_b.example"),
            ("localhost", "localhost"),
        ];
        for (raw, want) in names {
            assert_eq!(normalize_host(raw), Ok(Host::Name(want.into())), "{raw}");
        }
        let ips = [
            ("10.0.0.1", "10.0.0.1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("[::ffff:127.0.0.1]", "127.0.0.1"),
            ("::ffff:169.254.169.254", "169.254.169.254"),
            ("１２７.０.０.１", "127.0.0.1"),
        ];
        for (raw, want) in ips {
            assert_eq!(normalize_host(raw), Ok(Host::Ip(ip(want))), "{raw}");
        }
        let bad: &[(&str, HostError)] = &[
            ("", HostError::Empty),
            (".", HostError::Empty),
            ("a..b", HostError::Invalid("the host has an empty label")),
            (
                "example.com..",
                HostError::Invalid("the host has an empty label"),
            ),
            ("2130706433", HostError::Numeric),
            ("0x7f.0x1", HostError::Numeric),
            ("127.1", HostError::Numeric),
            ("010.0.0.1", HostError::Numeric),
            ("foo.123", HostError::Numeric),
        ];
        for (raw, want) in bad {
            assert_eq!(normalize_host(raw).as_ref(), Err(want), "{raw}");
        }
        for raw in [
            "exa mple.com",
            "a@b.com",
            "a/b",
            "a:b",
            "[::1",
            "[example.com]",
            "a\0b",
            "a%2eb",
        ] {
            assert!(normalize_host(raw).is_err(), "{raw:?} accepted");
        }
        assert_eq!(normalize_host(&"a".repeat(2000)), Err(HostError::TooLong));
        assert_eq!(
            normalize_host(&format!("{}.com", "a.".repeat(200))),
            Err(HostError::TooLong)
        );
        assert!(normalize_host(&format!("{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn refused_ranges_cover_special_and_embedded_addresses() {
        let protected = [
            net("172.18.0.0/16"),
            net("192.0.2.2/32"),
            net("fd00:dead::/32"),
        ];
        let refused = [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("168.63.129.16", "Azure"),
            ("100.100.100.200", "Alibaba"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("172.18.0.1", "protected"),
            ("192.0.2.2", "protected"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("fd00:ec2::254", "metadata"),
            ("fd00:dead::1", "protected"),
            ("2001:0:4136:e378::1", "Teredo"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "metadata"),
            ("::127.0.0.1", "loopback, embedded in a IPv4-compatible"),
            ("::169.254.169.254", "IPv4-compatible"),
            (
                "64:ff9b::169.254.169.254",
                "metadata address, embedded in a NAT64",
            ),
            ("64:ff9b::7f00:1", "NAT64"),
            (
                "64:ff9b::172.18.0.5",
                "protected network (the agent's host or a Docker network), embedded in a NAT64",
            ),
            ("2002:7f00:1::", "6to4"),
            ("2002:a9fe:a9fe::1", "metadata address, embedded in a 6to4"),
            ("2002:c000:0202:1::1", "6to4"),
        ];
        for (addr, what) in refused {
            let r = refusals(&ip(addr), &protected);
            assert!(!r.is_empty(), "{addr} not refused");
            let all: Vec<String> = r.iter().map(|(c, w)| format!("{c} {w}")).collect();
            assert!(
                all.iter().any(|w| w.contains(what)),
                "{addr}: {all:?} lacks {what}"
            );
            for (c, _) in &r {
                assert!(
                    c.contains(&canonical_ip(ip(addr))),
                    "{addr}: range {c} does not contain it"
                );
            }
        }
        let ordinary = [
            "1.1.1.1",
            "10.1.2.3",
            "172.17.0.1",
            "192.0.2.3",
            "100.64.0.1",
            "169.253.255.255",
            "169.255.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "223.255.255.255",
            "2001:db8::1",
            "2606:4700::1111",
            "fd00::1",
            "fc00::1",
            "64:ff9b::1.1.1.1",
            "2002:0101:0101::1",
            "::ffff:1.1.1.1",
            "2001:1::1",
        ];
        for addr in ordinary {
            assert_eq!(refusals(&ip(addr), &protected), vec![], "{addr}");
        }
    }

    struct Case {
        name: &'static str,
        allow: &'static [&'static str],
        deny: &'static [&'static str],
        host: &'static str,
        port: u16,
        resolved: &'static [&'static str],
        /// `Ok(rule text)` or `Err(fragment of the denial text)`.
        want: Result<&'static str, &'static str>,
    }

    #[test]
    fn decisions() {
        let protected = [net("172.18.0.0/16"), net("192.0.2.2/32")];
        let cases = [
            Case {
                name: "listed host",
                allow: &["registry.opentofu.org:443"],
                deny: &[],
                host: "registry.opentofu.org",
                port: 443,
                resolved: &["93.184.216.34"],
                want: Ok("registry.opentofu.org:443"),
            },
            Case {
                name: "host as asked is normalised",
                allow: &["registry.opentofu.org"],
                deny: &[],
                host: "Registry.OpenTofu.org.",
                port: 443,
                resolved: &["93.184.216.34"],
                want: Ok("registry.opentofu.org:443"),
            },
            Case {
                name: "IDNA host",
                allow: &["bücher.example"],
                deny: &[],
                host: "BÜCHER.example",
                port: 443,
                resolved: &["93.184.216.34"],
                want: Ok("xn--bcher-kva.example:443"),
            },
            Case {
                name: "nothing allowed by default",
                allow: &[],
                deny: &[],
                host: "example.com",
                port: 443,
                resolved: &["93.184.216.34"],
                want: Err("not in the egress allowlist"),
            },
            Case {
                name: "host not listed",
                allow: &["github.com"],
                deny: &[],
                host: "gitlab.com",
                port: 443,
                resolved: &["1.1.1.1"],
                want: Err("gitlab.com:443 is not in the egress allowlist"),
            },
            Case {
                name: "wrong port",
                allow: &["github.com"],
                deny: &[],
                host: "github.com",
                port: 22,
                resolved: &["1.1.1.1"],
                want: Err("github.com:22 is not in the egress allowlist"),
            },
            Case {
                name: "wildcard subdomain",
                allow: &["*.s3.eu-west-1.amazonaws.com:443"],
                deny: &[],
                host: "b.s3.eu-west-1.amazonaws.com",
                port: 443,
                resolved: &["52.1.1.1"],
                want: Ok("*.s3.eu-west-1.amazonaws.com:443"),
            },
            Case {
                name: "wildcard never the bare domain",
                allow: &["*.example.com"],
                deny: &[],
                host: "example.com",
                port: 443,
                resolved: &["1.1.1.1"],
                want: Err("not in the egress allowlist"),
            },
            Case {
                name: "deny beats allow",
                allow: &["*.example.com"],
                deny: &["secret.example.com:*"],
                host: "secret.example.com",
                port: 443,
                resolved: &["1.1.1.1"],
                want: Err("denied by the rule secret.example.com:*"),
            },
            Case {
                name: "deny network beats allowed name",
                allow: &["db.example.com:5432"],
                deny: &["10.66.0.0/16"],
                host: "db.example.com",
                port: 5432,
                resolved: &["10.1.1.1", "10.66.0.9"],
                want: Err("address 10.66.0.9 is denied by the rule 10.66.0.0/16"),
            },
            Case {
                name: "every resolved address must pass",
                allow: &["a.example"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["1.1.1.1", "127.0.0.1"],
                want: Err("address 127.0.0.1 is loopback"),
            },
            Case {
                name: "name resolving to metadata",
                allow: &["a.example"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["169.254.169.254"],
                want: Err("cloud metadata address"),
            },
            Case {
                name: "name resolving to mapped metadata",
                allow: &["a.example"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["::ffff:169.254.169.254"],
                want: Err("cloud metadata address"),
            },
            Case {
                name: "name resolving to NAT64 loopback",
                allow: &["a.example"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["64:ff9b::7f00:1"],
                want: Err("NAT64"),
            },
            Case {
                name: "name resolving to a docker network",
                allow: &["a.example"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["172.18.0.1"],
                want: Err("protected network"),
            },
            Case {
                name: "name resolving to the host",
                allow: &["a.example"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["192.0.2.2"],
                want: Err("protected network"),
            },
            Case {
                name: "name resolving to nothing",
                allow: &["a.example"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &[],
                want: Err("resolved to no address"),
            },
            Case {
                name: "loopback name with explicit allow",
                allow: &["a.example", "127.0.0.1/32"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["127.0.0.1"],
                want: Ok("a.example:443"),
            },
            Case {
                name: "explicit allow must cover the port",
                allow: &["a.example", "127.0.0.1/32:80"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["127.0.0.1"],
                want: Err("loopback"),
            },
            Case {
                name: "broad network does not open loopback",
                allow: &["a.example", "0.0.0.0/0"],
                deny: &[],
                host: "a.example",
                port: 443,
                resolved: &["127.0.0.1"],
                want: Err("loopback"),
            },
            Case {
                name: "network rule does not allow a name",
                allow: &["10.0.0.0/8"],
                deny: &[],
                host: "db.example",
                port: 5432,
                resolved: &["10.1.1.1"],
                want: Err("not in the egress allowlist"),
            },
            Case {
                name: "IP literal needs a network rule",
                allow: &["github.com"],
                deny: &[],
                host: "140.82.112.3",
                port: 443,
                resolved: &[],
                want: Err("none covers 140.82.112.3 port 443"),
            },
            Case {
                name: "IP literal in a network rule",
                allow: &["10.20.0.0/16:5432"],
                deny: &[],
                host: "10.20.3.4",
                port: 5432,
                resolved: &[],
                want: Ok("10.20.0.0/16:5432"),
            },
            Case {
                name: "IP literal wrong port",
                allow: &["10.20.0.0/16:5432"],
                deny: &[],
                host: "10.20.3.4",
                port: 22,
                resolved: &[],
                want: Err("none covers"),
            },
            Case {
                name: "narrowest network rule named",
                allow: &["10.0.0.0/8", "10.20.0.0/16"],
                deny: &[],
                host: "10.20.3.4",
                port: 1,
                resolved: &[],
                want: Ok("10.20.0.0/16"),
            },
            Case {
                name: "IP literal denied",
                allow: &["10.0.0.0/8"],
                deny: &["10.20.0.0/16"],
                host: "10.20.3.4",
                port: 1,
                resolved: &[],
                want: Err("denied by the rule 10.20.0.0/16"),
            },
            Case {
                name: "metadata literal",
                allow: &["0.0.0.0/0"],
                deny: &[],
                host: "169.254.169.254",
                port: 80,
                resolved: &[],
                want: Err("cloud metadata address"),
            },
            Case {
                name: "metadata literal explicitly allowed",
                allow: &["169.254.169.254:80"],
                deny: &[],
                host: "169.254.169.254",
                port: 80,
                resolved: &[],
                want: Ok("169.254.169.254:80"),
            },
            Case {
                name: "link-local network does not open metadata",
                allow: &["169.254.0.0/16"],
                deny: &[],
                host: "169.254.169.254",
                port: 80,
                resolved: &[],
                want: Err("cloud metadata address"),
            },
            Case {
                name: "link-local network opens other link-local",
                allow: &["169.254.0.0/16"],
                deny: &[],
                host: "169.254.3.3",
                port: 80,
                resolved: &[],
                want: Ok("169.254.0.0/16"),
            },
            Case {
                name: "mapped literal is its IPv4",
                allow: &["10.0.0.0/8"],
                deny: &[],
                host: "[::ffff:10.1.1.1]",
                port: 80,
                resolved: &[],
                want: Ok("10.0.0.0/8"),
            },
            Case {
                name: "mapped loopback literal",
                allow: &["0.0.0.0/0"],
                deny: &[],
                host: "[::ffff:127.0.0.1]",
                port: 80,
                resolved: &[],
                want: Err("loopback"),
            },
            Case {
                name: "IPv6 loopback literal",
                allow: &["::/0"],
                deny: &[],
                host: "[::1]",
                port: 80,
                resolved: &[],
                want: Err("loopback"),
            },
            Case {
                name: "IPv6 literal allowed",
                allow: &["[2001:db8::/32]:443"],
                deny: &[],
                host: "[2001:db8::5]",
                port: 443,
                resolved: &[],
                want: Ok("[2001:db8::/32]:443"),
            },
            Case {
                name: "6to4 metadata literal",
                allow: &["::/0"],
                deny: &[],
                host: "[2002:a9fe:a9fe::1]",
                port: 80,
                resolved: &[],
                want: Err("6to4"),
            },
            Case {
                name: "protected literal",
                allow: &["172.16.0.0/12"],
                deny: &[],
                host: "172.18.0.1",
                port: 8080,
                resolved: &[],
                want: Err("protected network"),
            },
            Case {
                name: "protected literal explicitly allowed",
                allow: &["172.18.0.0/16"],
                deny: &[],
                host: "172.18.0.1",
                port: 8080,
                resolved: &[],
                want: Ok("172.18.0.0/16"),
            },
            Case {
                name: "unspecified literal",
                allow: &["0.0.0.0/0"],
                deny: &[],
                host: "0.0.0.0",
                port: 80,
                resolved: &[],
                want: Err("unspecified"),
            },
            Case {
                name: "broadcast literal",
                allow: &["0.0.0.0/0"],
                deny: &[],
                host: "255.255.255.255",
                port: 80,
                resolved: &[],
                want: Err("broadcast"),
            },
            Case {
                name: "multicast literal",
                allow: &["0.0.0.0/0"],
                deny: &[],
                host: "224.0.0.251",
                port: 5353,
                resolved: &[],
                want: Err("multicast"),
            },
        ];
        for c in cases {
            let p = policy(c.allow, c.deny);
            let host = normalize_host(c.host).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            let resolved: Vec<IpAddr> = c.resolved.iter().map(|s| ip(s)).collect();
            let got = decide(&p, &host, c.port, &resolved, &protected);
            match (&got, c.want) {
                (Decision::Allowed { rule, addrs }, Ok(want)) => {
                    assert_eq!(rule, want, "{}", c.name);
                    match host {
                        Host::Ip(a) => assert_eq!(addrs, &vec![a], "{}", c.name),
                        Host::Name(_) => {
                            let want: Vec<IpAddr> =
                                resolved.iter().map(|a| canonical_ip(*a)).collect();
                            assert_eq!(addrs, &want, "{}", c.name)
                        }
                    }
                }
                (Decision::Denied(d), Err(fragment)) => {
                    assert!(
                        d.to_string().contains(fragment),
                        "{}: {d} lacks {fragment:?}",
                        c.name
                    )
                }
                _ => panic!("{}: got {got:?}, want {:?}", c.name, c.want),
            }
        }
    }

    #[test]
    fn duplicate_resolved_addresses_are_collapsed() {
        let p = policy(&["a.example"], &[]);
        let d = decide(
            &p,
            &Host::Name("a.example".into()),
            443,
            &[ip("1.1.1.1"), ip("::ffff:1.1.1.1")],
            &[],
        );
        assert_eq!(
            d,
            Decision::Allowed {
                rule: "a.example:443".into(),
                addrs: vec![ip("1.1.1.1")]
            }
        );
    }

    #[test]
    fn check_name_needs_no_dns() {
        let p = policy(&["*.example.com:443"], &["bad.example.com"]);
        assert!(check_name(&p, "x.example.com", 443).is_ok());
        assert!(matches!(
            check_name(&p, "bad.example.com", 443),
            Err(Denial::DeniedByRule { .. })
        ));
        assert!(matches!(
            check_name(&p, "x.example.org", 443),
            Err(Denial::NotListed { .. })
        ));
    }
}
