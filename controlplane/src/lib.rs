//! Delegate reference control plane (`delegate-cp`): the peer agents connect to, the user API and
//! the CLI that talks to it.
//!
//! Module map:
//! - `config`: `DIR/controlplane.toml` and the data directory layout.
//! - `init`: creating a data directory (CA, certificates, token, agent bundles).
//! - `pki`, `tls`: certificates and rustls configurations (TLS 1.3 only everywhere).
//! - `store` (+ `store_tasks`, `store_state`, `store_secrets`), `at_rest`, `audit`: SQLite database
//!   with versioned migrations, sealed blobs and values (AES-256-GCM; `at_rest` is the one place
//!   sealing goes), workspace secrets, the hash-chained audit trail.
//! - `hub`: in-memory view of connected agents, task secrets and recent rejections.
//! - `dispatch`, `seq`, `lock`, `lease`: decisions as pure functions (which agent gets a task,
//!   what to do with a sequenced message, who holds a workspace lock, what happens to a silent
//!   agent's tasks).
//! - `cp`: the control plane's shared state and the dispatcher loop.
//! - `tokens`, `enroll`, `revoke` (+ `store_enroll`): bootstrap tokens, enrollment and renewal
//!   of agent certificates, revocation.
//! - `agent_link`: the agent endpoint (mTLS, WebSocket, Hello/Welcome, heartbeats, frames).
//! - `tasks`, `state`: what agents' task messages and state requests do.
//! - `task_ops`: what users do to tasks (submit, cancel, approve); `approval`: how long a plan's
//!   secrets are kept for its approval.
//! - `api`, `api_tasks`, `api_admin`: the user API (HTTPS, bearer token, JSON); `api_admin` has
//!   workspace secrets and at-rest keys; `json_body` parses request bodies without echoing values.
//! - `keys`: `keys rotate` / `keys reseal` (through a running control plane, or offline).
//! - `serve`: binding listeners and running everything until shutdown.
//! - `client`, `cli`, `cli_admin`, `pack`: the CLI side: HTTP client, commands and output,
//!   workspace packing.

pub mod agent_link;
pub mod api;
pub mod api_admin;
pub mod api_tasks;
pub mod approval;
pub mod at_rest;
pub mod audit;
pub mod cli;
pub mod cli_admin;
pub mod client;
pub mod config;
pub mod cp;
pub mod demo;
pub mod dispatch;
pub mod enroll;
pub mod hub;
pub mod init;
pub mod json_body;
pub mod keys;
pub mod lease;
pub mod lock;
pub mod pack;
pub mod pki;
pub mod revoke;
pub mod seq;
pub mod serve;
pub mod state;
pub mod store;
pub mod store_enroll;
pub mod store_secrets;
pub mod store_state;
pub mod store_tasks;
pub mod task_ops;
pub mod tasks;
pub mod tls;
pub mod token;
pub mod tokens;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The last millisecond RFC 3339 can show (9999-12-31T23:59:59.999Z): its years have four
/// digits, and humantime's formatter panics past them.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// RFC 3339 (UTC, milliseconds) of a `*_ms` timestamp. Total: times before 1970 show as the
/// epoch, times past year 9999 as its last millisecond (stored values come from agents too).
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.clamp(0, MAX_TIMESTAMP_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_total() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(MAX_TIMESTAMP_MS), "9999-12-31T23:59:59.999Z");
        for ms in [MAX_TIMESTAMP_MS + 1, 253_402_300_800_000, i64::MAX] {
            assert_eq!(rfc3339(ms), "9999-12-31T23:59:59.999Z");
        }
    }
}
