//! Test helpers for the end-to-end suite: build and locate the real binaries, start a real control plane
//! and real agents as child processes on loopback ephemeral ports in temp dirs, make certificates,
//! build the sandbox image from the tofu/terraform found on PATH, and clean up every Docker object a
//! test run created (by label), pass or fail.
//!
//! These helpers never talk to anything but loopback and the project's own containers (`upstream`:
//! a container of the run on no Docker network, reached over a veth pair the test creates).

pub mod api;
pub mod certs;
pub mod docker;
pub mod fleet;
pub mod net;
pub mod process;
pub mod upstream;

pub use process::{ControlPlane, RunningAgent};

use std::time::{Duration, Instant};

/// The label every Docker object created for a test run carries.
pub const RUN_LABEL: &str = "io.delegate.test-run";

/// A unique id for one test (process id + random), used in labels and names.
pub fn run_id() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Poll `cond` until it returns true or `within` elapses; panics with `what` and the last state.
/// This is a liveness bound, not a performance assertion: choose it generously.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let start = Instant::now();
    let mut last = String::from("never checked");
    while start.elapsed() < within {
        match cond().await {
            Ok(true) => return,
            Ok(false) => last = "condition false".into(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {within:?} waiting for: {what} (last: {last})");
}

/// `assert_eventually!(within, "what", async { ... -> bool })`
#[macro_export]
macro_rules! assert_eventually {
    ($within:expr, $what:expr, $body:expr) => {
        $crate::eventually($what, $within, || async { Ok::<bool, String>($body) }).await
    };
}
