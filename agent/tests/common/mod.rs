//! Shared by the agent's Docker integration tests (`sandbox_docker.rs`, `restart.rs`): the sandbox
//! image built from the real tofu/terraform on PATH, a per-test run id whose label marks every
//! Docker object a test creates (removed when the run is dropped, pass or fail), and workspace
//! archives.
//!
//! Never substitutes a fake tofu, and never removes anything that does not carry the run's label.

#![allow(dead_code)] // each test binary uses its own part

use delegate_agent::sandbox::{self, docker as sdocker, PullPolicy, Sandbox, SandboxSettings};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;

pub const IMAGE: &str = "delegate-sandbox:itest";
pub const RUN_LABEL: &str = "io.delegate.test-run";

/// `tofu` or `terraform` from PATH; never a fake.
pub fn tofu_binary() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["tofu", "terraform"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "these tests need the `tofu` or `terraform` binary on PATH (a static build; it is copied \
         into a FROM scratch image)"
    );
}

static IMAGE_READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The sandbox image, built once per test binary.
pub async fn image() -> &'static str {
    IMAGE_READY
        .get_or_init(|| async {
            let labels = BTreeMap::from([("io.delegate.test".to_string(), "1".to_string())]);
            sandbox::build_image_from_binary(&tofu_binary(), IMAGE, &labels)
                .await
                .expect("build the sandbox image from the binary on PATH");
        })
        .await;
    IMAGE
}

/// A unique run id; removes everything carrying it when dropped.
pub struct Run {
    pub id: String,
    /// Prefix of the agent id the run's sandboxes use.
    prefix: &'static str,
}

impl Run {
    pub fn new(prefix: &'static str) -> Run {
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            Uuid::new_v4().simple()
        );
        Run { id, prefix }
    }

    pub fn label(&self) -> String {
        format!("{RUN_LABEL}={}", self.id)
    }

    /// The agent id of this run's sandboxes.
    pub fn agent(&self) -> String {
        format!("{}-{}", self.prefix, self.id)
    }

    pub fn settings(&self) -> SandboxSettings {
        SandboxSettings {
            image: IMAGE.into(),
            pull_policy: PullPolicy::Never,
            memory_bytes: 512 << 20,
            cancel_grace: Duration::from_secs(2),
            extra_labels: BTreeMap::from([(RUN_LABEL.to_string(), self.id.clone())]),
            pool: "itest".into(),
            ..SandboxSettings::default()
        }
    }

    pub async fn sandbox(&self) -> Sandbox {
        image().await;
        Sandbox::connect(self.settings(), &self.agent())
            .await
            .expect("connect to Docker")
    }

    /// Containers, volumes and networks carrying this run's label.
    pub async fn leftovers(&self) -> Vec<String> {
        let docker = bollard::Docker::connect_with_defaults().unwrap();
        let filters = std::collections::HashMap::from([("label".to_string(), vec![self.label()])]);
        let mut left = Vec::new();
        let cs = docker
            .list_containers(Some(bollard::container::ListContainersOptions {
                all: true,
                filters: filters.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
        left.extend(cs.into_iter().map(|c| format!("container {:?}", c.names)));
        let ns = docker
            .list_networks(Some(bollard::network::ListNetworksOptions {
                filters: filters.clone(),
            }))
            .await
            .unwrap();
        left.extend(ns.into_iter().map(|n| format!("network {:?}", n.name)));
        let vs = docker
            .list_volumes(Some(bollard::volume::ListVolumesOptions { filters }))
            .await
            .unwrap();
        left.extend(
            vs.volumes
                .unwrap_or_default()
                .into_iter()
                .map(|v| format!("volume {}", v.name)),
        );
        left
    }

    pub async fn assert_clean(&self) {
        let left = self.leftovers().await;
        assert!(left.is_empty(), "objects left behind: {left:?}");
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let label = self.label();
        // A fresh runtime on its own thread: this may run inside a test's runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(d) = bollard::Docker::connect_with_defaults() {
                    let _ = sdocker::remove_labelled(&d, &[label], |_| false).await;
                }
            });
        })
        .join();
    }
}

/// A gzipped tar of text files.
pub fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, text) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, text.as_bytes()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}
