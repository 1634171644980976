//! The egress allowlist: the rules an operator writes, the decision for each destination a sandbox
//! asks for, the proxy that enforces it, and the host firewall rules that make the proxy the only
//! way out.
//!
//! Owns: parsing and narrowing policies ([`rules`]), the decision ([`matcher`]), the proxy and its
//! audit records ([`proxy`], with the pure parsers [`request`] and [`sni`]), the host's own
//! addresses ([`local`]) and the per-bridge firewall rules ([`firewall`]).
//! Never: resolves a name no rule allows, connects to an address it did not check, logs a proxy
//! password, or listens anywhere but the address it is given (a task network's gateway IP).
//!
//! # Topology (Docker)
//!
//! ```text
//!   sandbox container ── task network (internal: true, bridge dlgX, subnet S, gateway G) ──┐
//!                                                                                           │ host
//!   agent: EgressProxy on G:p  ◄── the only thing a sandbox may reach (plus the state       │
//!          StateServer on G:b      backend), enforced by the INPUT rules below               │
//!          ── outbound to checked addresses only ──► allowed upstreams                       │
//! ```
//!
//! `dlgX` is the task network's bridge interface: `dlg` + the first 12 hex digits of the task id
//! (15 characters, the kernel's limit; `crate::sandbox::egress_wiring::bridge_name`), so its nft
//! table is `inet delegate_dlgX` and its iptables chain `DLG-dlgX`.
//!
//! - The task network is `internal: true`: Docker drops forwarding between it and any other
//!   interface, so nothing leaves it by routing. (Docker 20.10 still gives the containers a default
//!   route via `G`: a direct connection elsewhere reaches the host's FORWARD path, where the rules
//!   below reject it first — and remember it for the audit trail.)
//! - The proxy listens on the network's gateway IP `G` — an address the host holds on bridge `dlgX`
//!   — so only containers on that network reach it. One proxy per task network is the simplest
//!   wiring; several tasks may share one (each credential carries its own policy and may be
//!   fenced to its task subnet with `register(.., Some(S))`).
//! - `G` being a host address is also the hole: every host service bound to `0.0.0.0` (sshd, a
//!   database, docker-proxy for published ports, the agent's own metrics) answers a sandbox there,
//!   because traffic *to the host* takes the INPUT path, which Docker's isolation rules do not
//!   touch. Hence the agent owns, per task bridge ([`firewall::render_nft`]):
//!   - input: from `dlgX`, accept TCP to `G` on the proxy port and the state-backend port; reject
//!     everything else (TCP reset, ICMP admin-prohibited for the rest, so tools fail fast). This
//!     covers every host address, not only `G`, and IPv6.
//!   - forward: reject anything entering or leaving `dlgX` from or to another interface — a second
//!     lock behind Docker's isolation, and it also stops DNAT'd published ports of other
//!     containers and other tasks' networks.
//!   - nft also remembers each distinct TCP/UDP destination it rejected from `dlgX` (input and
//!     forward), so a sandbox's attempts to bypass the proxy are audited
//!     ([`firewall::rejected`]).
//!
//!   With nftables these live in one table per bridge (`inet delegate_dlgX`), applied atomically and
//!   removed with the task, independent of the iptables backend Docker uses; without `nft` the same
//!   set is rendered for `iptables`/`ip6tables` ([`firewall::render_iptables`]).
//! - Names are resolved by the proxy, never by the sandbox; the proxy refuses loopback, link-local
//!   and metadata addresses, Docker subnets and the host's own addresses by default, so even an
//!   allowed name that resolves inward is refused.
//!
//! What this needs: the agent runs on the Docker host's network namespace with `CAP_NET_ADMIN` (the
//! systemd service). An agent in a container cannot reach the bridges' INPUT path; there the
//! operator must apply equivalent rules on the node.
//!
//! # Wiring for one task (what the sandbox side calls)
//!
//! (`crate::sandbox::egress_wiring` does exactly this; one proxy per task.)
//!
//! 1. Policy: `let (policy, refused) = operator_policy.for_task(&spec.egress);` — report each
//!    refused entry to the user (Notice event). The operator policy is
//!    `Policy::parse(&config.egress.allow, &config.egress.deny)` (reject the config on error).
//! 2. After creating the network: `protected` = [`local::host_addresses`] plus the subnets of every
//!    Docker network; `EgressProxy::start(ProxyConfig::new(SocketAddr::new(gateway, 0), protected),
//!    Arc::new(SystemResolver), records_tx)`.
//! 3. `let creds = proxy.register(&task_id, policy, Some(task_subnet))?;`
//! 4. `firewall::apply(backend, &Isolation { bridge, gateway, proxy_port, backend_port })` before
//!    the first container starts (`backend` from [`firewall::detect`], checked usable once at start
//!    by `crate::sandbox::egress_wiring::firewall_backend`; bridge `dlg` + the first 12 hex digits
//!    of the task id, `egress_wiring::bridge_name`, which the agent gives Docker as the network's
//!    `com.docker.network.bridge.name` option, so the rules are named before Docker answers).
//! 5. Container env: `creds.sandbox_env(proxy.local_addr(), &[gateway.to_string()])` (NO_PROXY lets
//!    tofu reach the state backend directly). The password is a secret: add `creds.password` to the
//!    task's redaction set.
//! 6. Drain `records_rx`: each [`proxy::EgressRecord`] is an audit record; denials also a Notice.
//! 7. At the end: `proxy.unregister(&task_id)`, `proxy.shutdown().await`, `firewall::remove(..)`,
//!    then remove the network.

pub mod firewall;
pub mod local;
pub mod matcher;
pub mod proxy;
pub mod request;
pub mod rules;
pub mod sni;
