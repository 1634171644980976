//! Docker helpers for tests: the sandbox image from the tofu/terraform on PATH, small local images
//! built from an in-memory context (removed on drop), and label-based cleanup that runs pass or
//! fail.

use crate::process::bin;
use crate::RUN_LABEL;
use std::process::Command;
use std::sync::OnceLock;

/// The tag of the sandbox image the tests build.
pub const TEST_IMAGE: &str = "delegate-sandbox:test";

/// Path of `tofu` or `terraform` on PATH. Panics saying so when neither is found: tests never use a
/// fake tofu.
pub fn tofu_binary() -> std::path::PathBuf {
    for name in ["tofu", "terraform"] {
        if let Ok(out) = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
        {
            let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !p.is_empty() {
                return p.into();
            }
        }
    }
    panic!(
        "neither `tofu` nor `terraform` was found on PATH: the end-to-end tests need one of them"
    );
}

/// Build the sandbox image once per test process with `delegate sandbox build-image`.
pub fn sandbox_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new(bin("delegate"))
            .args(["sandbox", "build-image", "--from-binary"])
            .arg(tofu_binary())
            .args(["--tag", TEST_IMAGE])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "delegate sandbox build-image failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    TEST_IMAGE
}

/// Ids of containers, volumes and networks carrying this run's label.
pub fn labelled(run: &str) -> Vec<String> {
    let filter = format!("label={RUN_LABEL}={run}");
    let mut found = Vec::new();
    for args in [
        vec!["ps", "-aq", "--filter", &filter],
        vec!["volume", "ls", "-q", "--filter", &filter],
        vec!["network", "ls", "-q", "--filter", &filter],
    ] {
        if let Ok(out) = Command::new("docker").args(&args).output() {
            found.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| format!("{} {}", args[0], l.trim())),
            );
        }
    }
    found
}

/// Removes everything labelled with the run id when dropped, pass or fail.
pub struct Cleanup {
    pub run: String,
}

impl Cleanup {
    pub fn new(run: &str) -> Cleanup {
        Cleanup { run: run.into() }
    }
    pub fn remove_all(&self) {
        let filter = format!("label={RUN_LABEL}={}", self.run);
        let list = |args: &[&str]| -> Vec<String> {
            Command::new("docker")
                .args(args)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let containers = list(&["ps", "-aq", "--filter", &filter]);
        if !containers.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&containers)
                .output();
        }
        let networks = list(&["network", "ls", "-q", "--filter", &filter]);
        if !networks.is_empty() {
            let _ = Command::new("docker")
                .args(["network", "rm"])
                .args(&networks)
                .output();
        }
        let volumes = list(&["volume", "ls", "-q", "--filter", &filter]);
        if !volumes.is_empty() {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f"])
                .args(&volumes)
                .output();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// A build context assembled in memory, for the small local images some tests build (never pulled
/// from or pushed to a registry).
pub struct BuildContext {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for BuildContext {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildContext {
    pub fn new() -> BuildContext {
        BuildContext {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    /// A regular file at `path` with `mode`.
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        self.tar.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    /// `docker build -q -t TAG -` of this context (which must hold a `Dockerfile`); `classic` uses
    /// the classic builder (`DOCKER_BUILDKIT=0`), which takes a local base image as it is and never
    /// asks a registry. Panics with `what` and Docker's stderr on failure. The image is removed
    /// when the returned value is dropped.
    pub fn build(self, tag: &str, classic: bool, what: &str) -> Image {
        let context = self.tar.into_inner().unwrap();
        let mut cmd = Command::new("docker");
        cmd.args(["build", "-q", "-t", tag, "-"]);
        if classic {
            cmd.env("DOCKER_BUILDKIT", "0");
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &context).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "building {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Image { tag: tag.into() }
    }
}

/// A locally built image, removed (`docker rmi -f`) on drop.
pub struct Image {
    pub tag: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.tag])
            .output();
    }
}
