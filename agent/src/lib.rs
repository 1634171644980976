//! The Delegate agent: holds an outbound mutual-TLS WebSocket to the control plane, runs the tasks it
//! is given in hardened Docker sandboxes, and streams their output back.
//!
//! Module map (each module's own docs say what it owns and what it must never do):
//! - `config`: the TOML + `DELEGATE_*` configuration, validated once at start.
//! - `tls`: the rustls client configuration (TLS 1.3 only, configured CA, optional SPKI pin).
//! - `link`: the connection lifecycle (connect, Hello/Welcome, heartbeats, reconnect with backoff).
//! - `tasks`: the task lifecycle on the link side (accept, inputs, sequencing, cancel, done).
//! - `task_io`: the seam between `tasks` and `sandbox`.
//! - `sandbox`: Docker: images, per-task volume and network, hardened step containers.
//! - `egress`: the allowlisting proxy a sandbox reaches the outside through.
//! - `redact`: the streaming secret redactor over every byte a sandbox emits.
//! - `spool`: the encrypted on-disk spool of everything sent about a task, and the task journal.

pub mod config;
pub mod daemon;
pub mod doctor;
pub mod egress;
pub mod enroll;
pub mod link;
pub mod metrics;
pub mod mirror;
pub mod notify;
pub mod redact;
pub mod reload;
pub mod renew;
pub mod sandbox;
pub mod service;
pub mod spool;
pub mod task_io;
pub mod tasks;
pub mod tls;
