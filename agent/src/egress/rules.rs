//! Egress rules: parsing and validating allow/deny entries, and narrowing the operator's policy to
//! what a task asked for.
//!
//! Entry forms (whitespace around an entry is ignored):
//!
//! | entry | meaning |
//! | --- | --- |
//! | `registry.opentofu.org:443` | that host name, that port |
//! | `github.com` | that host name, port 443 |
//! | `*.s3.eu-west-1.amazonaws.com:443` | any name *under* that suffix (any depth), never the bare suffix |
//! | `mirror.example:*` | any port (useful in deny lists) |
//! | `10.20.0.0/16:5432`, `10.20.0.0/16` | addresses in that network, that port / every port |
//! | `192.0.2.7:8443`, `192.0.2.7` | one address (a /32 or /128 network) |
//! | `[fd00::/8]:443`, `fd00::/8`, `[2001:db8::1]:443`, `2001:db8::1` | the IPv6 equivalents |
//!
//! Host names default to port 443; addresses and networks without a port cover every port, as a
//! network rule does in a firewall. Host names are normalised exactly as the proxy normalises what a
//! sandbox asks for (see [`super::matcher::normalize_host`]).
//!
//! Refused at validation, each error naming the entry: empty entries and labels, ports outside
//! 1–65535, `*` anywhere but a leading `*.`, networks with host bits set, and wildcards over a public
//! suffix. The built-in public-suffix list ([`PUBLIC_SUFFIXES`]) is deliberately small: every
//! single-label suffix (`*.com`, `*.internal`, …), the common two-label country registries
//! (`*.co.uk`, `*.com.au`, …) and a few shared hosting platforms (`*.github.io`, …). It is not the
//! full Mozilla list, so suffixes such as `s3.eu-west-1.amazonaws.com` (a public suffix in the
//! Mozilla list's private section, and the issue's own example) stay allowed.
//!
//! This module is pure: it does no I/O, no DNS, no logging.

use super::matcher::{normalize_host, Host};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use thiserror::Error;

/// Port used for a host entry written without one.
pub const DEFAULT_PORT: u16 = 443;

/// Multi-label suffixes under which a wildcard is refused (every single-label suffix is refused
/// too). Country-code second-level registries and shared hosting platforms, where `*.suffix` would
/// allow strangers' domains.
pub const PUBLIC_SUFFIXES: &[&str] = &[
    // United Kingdom
    "co.uk",
    "org.uk",
    "me.uk",
    "ltd.uk",
    "plc.uk",
    "net.uk",
    "ac.uk",
    "gov.uk",
    "sch.uk",
    "nhs.uk",
    // Australia, New Zealand
    "com.au",
    "net.au",
    "org.au",
    "edu.au",
    "gov.au",
    "id.au",
    "co.nz",
    "net.nz",
    "org.nz",
    "govt.nz",
    "ac.nz",
    // Asia
    "co.jp",
    "ne.jp",
    "or.jp",
    "ac.jp",
    "go.jp",
    "co.kr",
    "or.kr",
    "go.kr",
    "com.cn",
    "net.cn",
    "org.cn",
    "gov.cn",
    "edu.cn",
    "com.hk",
    "org.hk",
    "com.tw",
    "org.tw",
    "com.sg",
    "org.sg",
    "com.my",
    "co.id",
    "or.id",
    "com.ph",
    "com.vn",
    "co.in",
    "net.in",
    "org.in",
    "gov.in",
    "co.th",
    "in.th",
    "com.pk",
    "co.il",
    "org.il",
    "ac.il",
    // Americas
    "com.br",
    "net.br",
    "org.br",
    "gov.br",
    "com.mx",
    "org.mx",
    "gob.mx",
    "com.ar",
    "gob.ar",
    "com.co",
    "com.pe",
    "co.ve",
    "com.uy",
    // Europe, Africa, Middle East
    "com.tr",
    "gov.tr",
    "com.pl",
    "net.pl",
    "org.pl",
    "co.at",
    "or.at",
    "gv.at",
    "com.es",
    "org.es",
    "com.gr",
    "com.pt",
    "com.ru",
    "com.ua",
    "co.za",
    "org.za",
    "gov.za",
    "com.eg",
    "com.sa",
    "com.ng",
    "co.ke",
    // Shared hosting platforms
    "github.io",
    "gitlab.io",
    "herokuapp.com",
    "appspot.com",
    "azurewebsites.net",
    "cloudapp.net",
    "cloudfront.net",
    "netlify.app",
    "vercel.app",
    "pages.dev",
    "workers.dev",
    "web.app",
    "firebaseapp.com",
];

/// Why an entry was refused. None is retryable: the entry must be fixed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RuleError {
    #[error("egress entry {entry:?} is empty")]
    Empty { entry: String },
    #[error("egress entry {entry:?}: port {port:?} is not a number in 1-65535 or *")]
    BadPort { entry: String, port: String },
    #[error("egress entry {entry:?}: a wildcard over the public suffix {suffix:?} would allow every domain under it")]
    PublicSuffix { entry: String, suffix: String },
    #[error(
        "egress entry {entry:?}: a wildcard is only allowed as a leading \"*.\" on a host name"
    )]
    BadWildcard { entry: String },
    #[error("egress entry {entry:?}: {reason}")]
    BadHost { entry: String, reason: String },
    #[error("egress entry {entry:?}: {reason}")]
    BadNetwork { entry: String, reason: String },
}

/// An IPv4 or IPv6 network; host bits are always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// A network; refuses a prefix longer than the address and host bits that are set. An
    /// IPv4-mapped IPv6 network (`::ffff:a.b.c.d/96+n`) is the IPv4 network it maps, as the
    /// matcher reads such addresses as IPv4.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let max = max_prefix(&addr);
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than /{max}"));
        }
        let masked = mask(addr, prefix);
        if masked != addr {
            return Err(format!(
                "host bits are set (the network is {masked}/{prefix})"
            ));
        }
        Ok(Cidr::mapped_to_v4(addr, prefix))
    }

    /// The network holding exactly `addr`.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr::mapped_to_v4(addr, max_prefix(&addr))
    }

    fn mapped_to_v4(addr: IpAddr, prefix: u8) -> Cidr {
        match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                },
                None => Cidr { addr, prefix },
            },
            _ => Cidr { addr, prefix },
        }
    }

    /// The network of `addr` with `prefix` bits, host bits cleared (for built-in tables).
    pub(crate) fn truncating(addr: IpAddr, prefix: u8) -> Cidr {
        let prefix = prefix.min(max_prefix(&addr));
        Cidr {
            addr: mask(addr, prefix),
            prefix,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network (never across address families).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        same_family(&self.addr, ip) && mask(*ip, self.prefix) == self.addr
    }

    /// Whether every address of `other` lies in this network.
    pub fn contains_net(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(&other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `a.b.c.d/n`, `v6/n` or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Cidr, String> {
        match s.split_once('/') {
            None => s
                .parse::<IpAddr>()
                .map(Cidr::host)
                .map_err(|_| "not an IP address".to_string()),
            Some((a, p)) => {
                let addr = a
                    .parse::<IpAddr>()
                    .map_err(|_| format!("{a:?} is not an IP address"))?;
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("prefix {p:?} is not a number"));
                }
                let prefix = p
                    .parse::<u8>()
                    .map_err(|_| format!("prefix {p:?} is too long"))?;
                Cidr::new(addr, prefix)
            }
        }
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// Which ports a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ports {
    Any,
    One(u16),
}

impl Ports {
    pub fn covers(&self, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::One(p) => *p == port,
        }
    }

    fn covers_ports(&self, other: &Ports) -> bool {
        match (self, other) {
            (Ports::Any, _) => true,
            (Ports::One(a), Ports::One(b)) => a == b,
            (Ports::One(_), Ports::Any) => false,
        }
    }
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Exactly this (normalised) host name.
    Host(String),
    /// Any name strictly under this suffix, at any depth (`*.suffix`).
    Suffix(String),
    /// Any address in this network.
    Net(Cidr),
}

/// One parsed allow or deny entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub target: Target,
    pub ports: Ports,
}

impl Rule {
    /// Parse one entry (see the module docs for the forms).
    pub fn parse(entry: &str) -> Result<Rule, RuleError> {
        let shown = shown(entry);
        let s = entry.trim();
        if s.is_empty() {
            return Err(RuleError::Empty { entry: shown });
        }
        let (host, port) = split_port(s).map_err(|reason| RuleError::BadNetwork {
            entry: shown.clone(),
            reason,
        })?;
        let port_given = port.is_some();
        let ports = match port {
            None => None,
            Some(p) => Some(parse_port(p).ok_or_else(|| RuleError::BadPort {
                entry: shown.clone(),
                port: p.chars().take(16).collect(),
            })?),
        };
        if host.is_empty() {
            return Err(RuleError::BadHost {
                entry: shown,
                reason: "the host is empty".into(),
            });
        }
        if host.contains('/') {
            let net = host
                .parse::<Cidr>()
                .map_err(|reason| RuleError::BadNetwork {
                    entry: shown.clone(),
                    reason,
                })?;
            return Ok(Rule {
                target: Target::Net(net),
                ports: ports.unwrap_or(Ports::Any),
            });
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Rule {
                target: Target::Net(Cidr::host(ip)),
                ports: ports.unwrap_or(Ports::Any),
            });
        }
        let ports = ports.unwrap_or(Ports::One(DEFAULT_PORT));
        if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(RuleError::BadWildcard { entry: shown });
            }
            let name = match normalize_host(suffix) {
                Ok(Host::Name(n)) => n,
                Ok(Host::Ip(_)) => {
                    return Err(RuleError::BadHost {
                        entry: shown,
                        reason: "a wildcard applies to host names, not addresses".into(),
                    })
                }
                Err(e) => {
                    return Err(RuleError::BadHost {
                        entry: shown,
                        reason: e.to_string(),
                    })
                }
            };
            if is_public_suffix(&name) {
                return Err(RuleError::PublicSuffix {
                    entry: shown,
                    suffix: name,
                });
            }
            return Ok(Rule {
                target: Target::Suffix(name),
                ports,
            });
        }
        if host.contains('*') {
            return Err(RuleError::BadWildcard { entry: shown });
        }
        match normalize_host(host) {
            Ok(Host::Name(n)) => Ok(Rule {
                target: Target::Host(n),
                ports,
            }),
            // Reached for forms only `normalize_host` reads as addresses (e.g. `[::1]` brackets).
            Ok(Host::Ip(ip)) => Ok(Rule {
                target: Target::Net(Cidr::host(ip)),
                ports: if port_given { ports } else { Ports::Any },
            }),
            Err(e) => Err(RuleError::BadHost {
                entry: shown,
                reason: e.to_string(),
            }),
        }
    }

    /// Whether this rule covers the (normalised) host name at `port`. Never true for network rules.
    pub fn matches_name(&self, name: &str, port: u16) -> bool {
        self.ports.covers(port)
            && match &self.target {
                Target::Host(h) => h == name,
                Target::Suffix(s) => is_strictly_under(name, s),
                Target::Net(_) => false,
            }
    }

    /// Whether this rule covers `ip` at `port`. Only network rules do.
    pub fn matches_addr(&self, ip: &IpAddr, port: u16) -> bool {
        self.ports.covers(port)
            && match &self.target {
                Target::Net(n) => n.contains(ip),
                _ => false,
            }
    }

    /// Whether every destination `other` allows is also covered by `self`.
    pub fn covers(&self, other: &Rule) -> bool {
        self.ports.covers_ports(&other.ports)
            && match (&self.target, &other.target) {
                (Target::Host(a), Target::Host(b)) => a == b,
                (Target::Suffix(s), Target::Host(h)) => is_strictly_under(h, s),
                (Target::Suffix(s), Target::Suffix(t)) => s == t || is_strictly_under(t, s),
                (Target::Net(a), Target::Net(b)) => a.contains_net(b),
                _ => false,
            }
    }

    /// The network of a network rule.
    pub fn net(&self) -> Option<&Cidr> {
        match &self.target {
            Target::Net(n) => Some(n),
            _ => None,
        }
    }
}

/// Canonical form, as shown in audit records (`*.example.com:443`, `[fd00::/8]:443`, `10.0.0.0/8`).
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = match self.ports {
            Ports::Any => "*".to_string(),
            Ports::One(p) => p.to_string(),
        };
        match &self.target {
            Target::Host(h) => write!(f, "{h}:{port}"),
            Target::Suffix(s) => write!(f, "*.{s}:{port}"),
            Target::Net(n) => {
                let text = if n.prefix == max_prefix(&n.addr) {
                    n.addr.to_string()
                } else {
                    n.to_string()
                };
                match (self.ports, n.addr) {
                    (Ports::Any, _) => write!(f, "{text}"),
                    (Ports::One(p), IpAddr::V6(_)) => write!(f, "[{text}]:{p}"),
                    (Ports::One(p), IpAddr::V4(_)) => write!(f, "{text}:{p}"),
                }
            }
        }
    }
}

/// The destinations a task may reach: `deny` wins over `allow`; an empty `allow` reaches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

impl Policy {
    /// Parse the operator's entries; every bad entry is reported, not only the first.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Policy, Vec<RuleError>> {
        let mut errors = Vec::new();
        let mut parse_all = |entries: &[String]| {
            let mut rules = Vec::new();
            for e in entries {
                match Rule::parse(e) {
                    Ok(r) => rules.push(r),
                    Err(err) => errors.push(err),
                }
            }
            rules
        };
        let allow = parse_all(allow);
        let deny = parse_all(deny);
        if errors.is_empty() {
            Ok(Policy { allow, deny })
        } else {
            Err(errors)
        }
    }

    /// The policy a task gets when it asks for `requested`: only the requested entries that one of
    /// this policy's allow rules covers, with this policy's deny rules kept in full. The second value
    /// lists each refused entry with why. Narrowing never widens: a request broader than the
    /// operator's rule (`*.example.com` against `api.example.com`) is refused, not clipped.
    ///
    /// An empty request grants nothing; use [`Policy::for_task`] for "no request means the operator's
    /// policy".
    pub fn narrow(&self, requested: &[String]) -> (Policy, Vec<(String, String)>) {
        let mut granted: Vec<Rule> = Vec::new();
        let mut refused = Vec::new();
        for entry in requested {
            let rule = match Rule::parse(entry) {
                Ok(r) => r,
                Err(e) => {
                    refused.push((entry.clone(), e.to_string()));
                    continue;
                }
            };
            if let Some(d) = self.deny.iter().find(|d| d.covers(&rule)) {
                refused.push((entry.clone(), format!("denied by the agent's rule {d}")));
            } else if self.allow.iter().any(|a| a.covers(&rule)) {
                if !granted.contains(&rule) {
                    granted.push(rule);
                }
            } else {
                refused.push((
                    entry.clone(),
                    "not covered by the agent's egress allowlist".into(),
                ));
            }
        }
        (
            Policy {
                allow: granted,
                deny: self.deny.clone(),
            },
            refused,
        )
    }

    /// The policy for a task: the operator's own when the task asked for nothing, else
    /// [`Policy::narrow`].
    pub fn for_task(&self, requested: &[String]) -> (Policy, Vec<(String, String)>) {
        if requested.is_empty() {
            (self.clone(), Vec::new())
        } else {
            self.narrow(requested)
        }
    }

    pub fn allows_nothing(&self) -> bool {
        self.allow.is_empty()
    }
}

/// Whether `name` is a proper subdomain of `suffix` (both normalised).
fn is_strictly_under(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.ends_with(suffix)
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
}

/// Whether a wildcard over `suffix` is refused.
pub fn is_public_suffix(suffix: &str) -> bool {
    !suffix.contains('.') || PUBLIC_SUFFIXES.contains(&suffix)
}

/// Split `host[:port]`, `[v6]`, `[v6]:port`, `[v6/n]:port`; an unbracketed entry with several
/// colons is an IPv6 address or network without a port.
fn split_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or("missing \"]\"")?;
        if inner.is_empty() {
            return Err("empty brackets".into());
        }
        if !inner.contains(':') {
            return Err("brackets are only for IPv6 addresses".into());
        }
        return match after {
            "" => Ok((inner, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((inner, Some(p))),
                None => Err(format!("unexpected {after:?} after \"]\"")),
            },
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => s
            .rsplit_once(':')
            .map(|(h, p)| (h, Some(p)))
            .ok_or_else(|| "bad port".into()),
        _ => Ok((s, None)),
    }
}

fn parse_port(p: &str) -> Option<Ports> {
    if p == "*" {
        return Some(Ports::Any);
    }
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(Ports::One(n)),
    }
}

/// An entry as shown in an error: bounded, so a hostile request cannot blow up a message.
fn shown(entry: &str) -> String {
    const MAX: usize = 200;
    if entry.chars().count() <= MAX {
        entry.to_string()
    } else {
        let mut s: String = entry.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        Rule::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_every_form_to_its_canonical_text() {
        let cases = [
            ("registry.opentofu.org:443", "registry.opentofu.org:443"),
            ("github.com", "github.com:443"),
            ("GitHub.COM.", "github.com:443"),
            (
                "  mirror.internal.example:8443 ",
                "mirror.internal.example:8443",
            ),
            (
                "*.s3.eu-west-1.amazonaws.com:443",
                "*.s3.eu-west-1.amazonaws.com:443",
            ),
            ("*.example.com", "*.example.com:443"),
            ("mirror.example:*", "mirror.example:*"),
            ("bücher.example", "xn--bcher-kva.example:443"),
            ("_svc.example.com:80", "_svc.example.com:80"),
            ("10.20.0.0/16:5432", "10.20.0.0/16:5432"),
            ("10.20.0.0/16", "10.20.0.0/16"),
            ("10.20.0.0/16:*", "10.20.0.0/16"),
            ("192.0.2.7:8443", "192.0.2.7:8443"),
            ("192.0.2.7", "192.0.2.7"),
            ("192.0.2.7/32", "192.0.2.7"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("[fd00::/8]:443", "[fd00::/8]:443"),
            ("fd00::/8", "fd00::/8"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:DB8::1]", "2001:db8::1"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("[::ffff:127.0.0.1]:80", "127.0.0.1:80"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("h:65535", "h:65535"),
            ("h:1", "h:1"),
        ];
        for (entry, canonical) in cases {
            assert_eq!(rule(entry).to_string(), canonical, "{entry}");
        }
    }

    #[test]
    fn refuses_bad_entries_naming_them() {
        type Want = fn(&RuleError) -> bool;
        let cases: &[(&str, Want)] = &[
            ("", |e| matches!(e, RuleError::Empty { .. })),
            ("   ", |e| matches!(e, RuleError::Empty { .. })),
            ("*.com", |e| matches!(e, RuleError::PublicSuffix { .. })),
            ("*.COM.:443", |e| {
                matches!(e, RuleError::PublicSuffix { .. })
            }),
            ("*.co.uk", |e| matches!(e, RuleError::PublicSuffix { .. })),
            ("*.com.au:443", |e| {
                matches!(e, RuleError::PublicSuffix { .. })
            }),
            ("*.github.io", |e| {
                matches!(e, RuleError::PublicSuffix { .. })
            }),
            ("*.internal", |e| {
                matches!(e, RuleError::PublicSuffix { .. })
            }),
            ("*", |e| matches!(e, RuleError::BadWildcard { .. })),
            ("*:443", |e| matches!(e, RuleError::BadWildcard { .. })),
            ("*example.com", |e| {
                matches!(e, RuleError::BadWildcard { .. })
            }),
            ("a.*.example.com", |e| {
                matches!(e, RuleError::BadWildcard { .. })
            }),
            ("*.*.example.com", |e| {
                matches!(e, RuleError::BadWildcard { .. })
            }),
            ("*.10.0.0.1", |e| matches!(e, RuleError::BadHost { .. })),
            ("example.com:0", |e| matches!(e, RuleError::BadPort { .. })),
            ("example.com:65536", |e| {
                matches!(e, RuleError::BadPort { .. })
            }),
            ("example.com:99999999999", |e| {
                matches!(e, RuleError::BadPort { .. })
            }),
            ("example.com:+443", |e| {
                matches!(e, RuleError::BadPort { .. })
            }),
            ("example.com:", |e| matches!(e, RuleError::BadPort { .. })),
            ("example.com:https", |e| {
                matches!(e, RuleError::BadPort { .. })
            }),
            (":443", |e| matches!(e, RuleError::BadHost { .. })),
            ("a..example.com", |e| matches!(e, RuleError::BadHost { .. })),
            (".example.com", |e| matches!(e, RuleError::BadHost { .. })),
            ("example.com..", |e| matches!(e, RuleError::BadHost { .. })),
            ("exa mple.com", |e| matches!(e, RuleError::BadHost { .. })),
            ("ex/ample", |e| matches!(e, RuleError::BadNetwork { .. })),
            ("user@example.com", |e| {
                matches!(e, RuleError::BadHost { .. })
            }),
            ("http://example.com", |e| {
                matches!(e, RuleError::BadPort { .. })
            }),
            ("2130706433", |e| matches!(e, RuleError::BadHost { .. })),
            ("0x7f.1", |e| matches!(e, RuleError::BadHost { .. })),
            ("010.0.0.1", |e| matches!(e, RuleError::BadHost { .. })),
            ("10.20.1.0/16:5432", |e| {
                matches!(e, RuleError::BadNetwork { .. })
            }),
            ("10.0.0.0/33", |e| matches!(e, RuleError::BadNetwork { .. })),
            ("10.0.0.0/", |e| matches!(e, RuleError::BadNetwork { .. })),
            ("10.0.0.0/-1", |e| matches!(e, RuleError::BadNetwork { .. })),
            ("10.0.0/8", |e| matches!(e, RuleError::BadNetwork { .. })),
            ("[fd00::/129]:443", |e| {
                matches!(e, RuleError::BadNetwork { .. })
            }),
            ("[fd00::/8", |e| matches!(e, RuleError::BadNetwork { .. })),
            ("[fd00::/8]443", |e| {
                matches!(e, RuleError::BadNetwork { .. })
            }),
            ("[]:443", |e| matches!(e, RuleError::BadNetwork { .. })),
            ("[example.com]:443", |e| {
                matches!(e, RuleError::BadNetwork { .. })
            }),
            ("[fd00::1]:0", |e| matches!(e, RuleError::BadPort { .. })),
            ("fd00::zz", |e| matches!(e, RuleError::BadHost { .. })),
            (&"a".repeat(64), |e| matches!(e, RuleError::BadHost { .. })),
        ];
        for (entry, want) in cases {
            match Rule::parse(entry) {
                Ok(r) => panic!("{entry:?} accepted as {r}"),
                Err(e) => {
                    assert!(want(&e), "{entry:?}: unexpected error {e:?}");
                    let shown_entry: String = entry.chars().take(50).collect();
                    assert!(
                        e.to_string().contains(&shown_entry),
                        "{entry:?}: message {e} does not name it"
                    );
                }
            }
        }
    }

    #[test]
    fn long_entries_are_shown_bounded() {
        let long = format!("{}:0", "a".repeat(5000));
        let e = Rule::parse(&long).unwrap_err();
        assert!(e.to_string().len() < 400);
    }

    #[test]
    fn wildcard_matches_subdomains_at_any_depth_but_not_the_bare_domain() {
        let r = rule("*.example.com:443");
        let cases = [
            ("a.example.com", 443, true),
            ("a.b.c.example.com", 443, true),
            ("example.com", 443, false),
            ("badexample.com", 443, false),
            ("a.example.com.evil", 443, false),
            ("a.example.com", 80, false),
        ];
        for (name, port, want) in cases {
            assert_eq!(r.matches_name(name, port), want, "{name}:{port}");
        }
        assert!(!r.matches_addr(&"10.0.0.1".parse().unwrap(), 443));
    }

    #[test]
    fn host_and_network_rules_match_only_their_kind() {
        let host = rule("example.com");
        assert!(host.matches_name("example.com", 443));
        assert!(!host.matches_name("www.example.com", 443));
        assert!(!host.matches_name("example.com", 8443));
        assert!(!host.matches_addr(&"93.184.216.34".parse().unwrap(), 443));
        let any = rule("example.com:*");
        assert!(any.matches_name("example.com", 1) && any.matches_name("example.com", 65535));
        let net = rule("10.20.0.0/16:5432");
        assert!(net.matches_addr(&"10.20.255.1".parse().unwrap(), 5432));
        assert!(!net.matches_addr(&"10.21.0.1".parse().unwrap(), 5432));
        assert!(!net.matches_addr(&"10.20.0.1".parse().unwrap(), 5433));
        assert!(!net.matches_addr(&"::ffff:10.20.0.1".parse().unwrap(), 5432));
        assert!(!net.matches_name("10.20.0.1", 5432));
        let v6 = rule("[fd00::/8]:443");
        assert!(v6.matches_addr(&"fd12::1".parse().unwrap(), 443));
        assert!(!v6.matches_addr(&"fe80::1".parse().unwrap(), 443));
        assert!(!v6.matches_addr(&"10.0.0.1".parse().unwrap(), 443));
        let everything = rule("0.0.0.0/0");
        assert!(everything.matches_addr(&"1.2.3.4".parse().unwrap(), 1));
        assert!(!everything.matches_addr(&"::1".parse().unwrap(), 1));
    }

    #[test]
    fn cidr_arithmetic() {
        let n: Cidr = "10.20.0.0/16".parse().unwrap();
        assert!(n.contains_net(&"10.20.1.0/24".parse().unwrap()));
        assert!(n.contains_net(&n));
        assert!(!n.contains_net(&"10.0.0.0/8".parse().unwrap()));
        assert!(!n.contains_net(&"fd00::/8".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains(&"2001:db8::1".parse().unwrap()));
        assert!(!all.contains(&"1.2.3.4".parse().unwrap()));
        assert_eq!(
            Cidr::truncating("10.1.2.3".parse().unwrap(), 8).to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(Cidr::host("::1".parse().unwrap()).to_string(), "::1/128");
        assert!(Cidr::new("10.0.0.1".parse().unwrap(), 8).is_err());
    }

    #[test]
    fn policy_parse_reports_every_bad_entry() {
        let errs = Policy::parse(
            &strings(&["ok.example", "*.com", "x:0"]),
            &strings(&["", "ok2"]),
        )
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        let p = Policy::parse(&strings(&["a.example"]), &strings(&["b.example"])).unwrap();
        assert_eq!(p.allow, vec![rule("a.example")]);
        assert_eq!(p.deny, vec![rule("b.example")]);
        assert!(Policy::default().allows_nothing());
    }

    #[test]
    fn narrowing_grants_only_what_the_operator_covers() {
        let operator = Policy::parse(
            &strings(&[
                "registry.opentofu.org:443",
                "*.amazonaws.com:443",
                "10.20.0.0/16",
                "mirror.example:*",
            ]),
            &strings(&["*.internal.amazonaws.com:*", "10.20.99.0/24"]),
        )
        .unwrap();
        let requested = strings(&[
            "registry.opentofu.org",          // granted (port 443 default)
            "registry.opentofu.org:80",       // wrong port
            "s3.eu-west-1.amazonaws.com:443", // under the wildcard
            "*.s3.amazonaws.com:443",         // narrower wildcard
            "amazonaws.com:443",              // the bare suffix is not under *.amazonaws.com
            "*.com:443",                      // invalid
            "10.20.1.0/24:5432",              // inside the network, one port
            "10.0.0.0/8",                     // wider than the operator's network
            "10.20.99.0/25",                  // inside a deny rule
            "x.internal.amazonaws.com",       // inside a deny rule
            "mirror.example:8443",            // any port covers one
            "github.com",                     // not listed
            "registry.opentofu.org:443",      // duplicate of the first: granted once
        ]);
        let (task, refused) = operator.narrow(&requested);
        let granted: Vec<String> = task.allow.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            granted,
            [
                "registry.opentofu.org:443",
                "s3.eu-west-1.amazonaws.com:443",
                "*.s3.amazonaws.com:443",
                "10.20.1.0/24:5432",
                "mirror.example:8443"
            ]
        );
        assert_eq!(
            task.deny, operator.deny,
            "operator denies always follow the task"
        );
        let refused_entries: Vec<&str> = refused.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(
            refused_entries,
            [
                "registry.opentofu.org:80",
                "amazonaws.com:443",
                "*.com:443",
                "10.0.0.0/8",
                "10.20.99.0/25",
                "x.internal.amazonaws.com",
                "github.com"
            ]
        );
        assert!(refused.iter().all(|(_, why)| !why.is_empty()));
        assert!(refused[4].1.contains("denied"), "{:?}", refused[4]);
    }

    #[test]
    fn narrowing_an_empty_operator_policy_grants_nothing() {
        let (task, refused) = Policy::default().narrow(&strings(&["github.com"]));
        assert!(task.allows_nothing());
        assert_eq!(refused.len(), 1);
        let (task, refused) = Policy::default().narrow(&[]);
        assert!(task.allows_nothing() && refused.is_empty());
    }

    #[test]
    fn for_task_without_a_request_keeps_the_operator_policy() {
        let operator = Policy::parse(&strings(&["github.com"]), &[]).unwrap();
        assert_eq!(operator.for_task(&[]).0, operator);
        assert!(operator
            .for_task(&strings(&["gitlab.com"]))
            .0
            .allows_nothing());
    }

    #[test]
    fn wildcard_never_covers_its_bare_domain() {
        let w = rule("*.example.com");
        assert!(!w.covers(&rule("example.com")));
        assert!(w.covers(&rule("a.example.com")));
        assert!(w.covers(&rule("*.a.example.com")));
        assert!(w.covers(&rule("*.example.com")));
        assert!(!rule("a.example.com").covers(&rule("*.a.example.com")));
        assert!(!rule("10.0.0.0/8").covers(&rule("example.com")));
        assert!(!rule("example.com:443").covers(&rule("example.com:*")));
    }

    proptest::proptest! {
        /// Whatever parses has a canonical text that parses back to the same rule, which covers
        /// itself; nothing panics.
        #[test]
        fn canonical_text_round_trips(entry in "[a-fA-F0-9*.:/\\[\\] ]{0,40}|[a-z]{1,8}(\\.[a-z]{1,8}){0,3}(:[0-9*]{1,5})?") {
            if let Ok(r) = Rule::parse(&entry) {
                let again = Rule::parse(&r.to_string()).unwrap();
                proptest::prop_assert_eq!(&again, &r);
                proptest::prop_assert!(r.covers(&r));
            }
        }
    }
}
