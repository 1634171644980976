//! The egress allowlist: the rules an operator writes, the decision for each destination a sandbox
//! asks for, and the proxy that enforces it.

pub mod firewall;
pub mod local;
pub mod matcher;
pub mod proxy;
pub mod request;
pub mod rules;
pub mod sni;
