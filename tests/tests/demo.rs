//! End to end: `delegate-cp demo`, the README's main command, from a missing sandbox image to
//! applied outputs, leaving nothing behind.

use delegate_tests::docker::Cleanup;
use delegate_tests::process::bin;
use delegate_tests::{run_id, RUN_LABEL};
use std::process::{Command, Stdio};

/// Removes the demo's private image tag, pass or fail.
struct ImageGuard(String);
impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

#[test]
fn demo_builds_a_missing_image_then_plans_and_applies_the_example() {
    // Make sure the tests' binary builds are in place before timing anything.
    let _ = bin("delegate");
    let run = run_id();
    let _cleanup = Cleanup::new(&run);
    let image = format!("delegate-sandbox:demo-{run}");
    let _image = ImageGuard(image.clone());
    let out = Command::new(bin("delegate-cp"))
        .args(["demo", "--image", &image, "--label"])
        .arg(format!("{RUN_LABEL}={run}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for needle in [
        "not found: building it locally from",
        "connected over mutual TLS 1.3",
        "Plan: 3 to add, 0 to change, 0 to destroy.",
        "Apply complete! Resources: 3 added",
        "greetings = [\"hello, world!\",\"hello, delegate!\"]",
        "==> done",
    ] {
        assert!(
            stdout.contains(needle),
            "missing {needle:?} in demo output:\n{stdout}"
        );
    }
    assert!(
        delegate_tests::docker::labelled(&run).is_empty(),
        "the demo left Docker objects: {:?}",
        delegate_tests::docker::labelled(&run)
    );
}
