//! The host's own addresses, for the proxy's protected-network list: a sandbox must not reach the
//! agent's host through any of its addresses, even by a name that resolves to one.
//!
//! Read from `/proc/self/net/fib_trie` (IPv4 local routes) and `/proc/self/net/if_inet6`, so no
//! netlink and no `unsafe`. These files show the network namespace the agent runs in: on a VM that
//! is the host; in a container sidecar it is the agent container's own, and the operator adds the
//! node's addresses to the protected list (or relies on the firewall rules of [`super::firewall`]).
//! They are read under `/proc/self/net`, not the `/proc/net` symlink: a procfs mounted with
//! `subset=pid` (systemd's `ProcSubset=pid`) hides `/proc/net` but keeps the process's own
//! directory, whose `net/` is the same view of its network namespace.
//!
//! The parsers are pure; [`host_addresses`] only reads the two files.

use super::rules::Cidr;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Every local IPv4 address in a `fib_trie` text (the `/32 host LOCAL` leaves).
pub fn parse_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut out = BTreeSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL") {
            if let Some(a) = last {
                out.insert(a);
            }
        }
    }
    out.into_iter().collect()
}

/// Every address in an `if_inet6` text.
pub fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        if hex.len() == 32 {
            if let Ok(bits) = u128::from_str_radix(hex, 16) {
                out.insert(Ipv6Addr::from(bits));
            }
        }
    }
    out.into_iter().collect()
}

/// The addresses of this network namespace as /32 and /128 networks. A file that cannot be read
/// contributes nothing (IPv6 may be disabled); both unreadable is an error.
pub fn host_addresses() -> std::io::Result<Vec<Cidr>> {
    let v4 = std::fs::read_to_string("/proc/self/net/fib_trie");
    let v6 = std::fs::read_to_string("/proc/self/net/if_inet6");
    if let (Err(e), Err(_)) = (&v4, &v6) {
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot read the host's addresses: {e}"),
        ));
    }
    let mut out: Vec<Cidr> = Vec::new();
    if let Ok(t) = v4 {
        out.extend(
            parse_fib_trie(&t)
                .into_iter()
                .map(|a| Cidr::host(IpAddr::V4(a))),
        );
    }
    if let Ok(t) = v6 {
        out.extend(
            parse_if_inet6(&t)
                .into_iter()
                .map(|a| Cidr::host(IpAddr::V6(a))),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.2
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 172.17.0.1
        /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
";

    const INET6: &str = "00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 02 40 00 80     eth0
fe8000000000000000fc00fffe000001 02 40 20 80     eth0
garbage
";

    #[test]
    fn parses_local_ipv4_addresses() {
        let got: Vec<String> = parse_fib_trie(FIB).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["127.0.0.1", "172.17.0.1", "192.0.2.2"]);
    }

    #[test]
    fn parses_ipv6_addresses() {
        let got: Vec<String> = parse_if_inet6(INET6)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["::1", "fd00::2", "fe80::fc:ff:fe00:1"]);
    }

    #[test]
    fn reads_this_hosts_addresses() {
        let addrs = host_addresses().unwrap();
        let loopback: Cidr = "127.0.0.1/32".parse().unwrap();
        assert!(addrs.contains(&loopback), "{addrs:?}");
    }
}
