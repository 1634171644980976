//! The sandbox image: applying the pull policy, finding which binary (`tofu` or `terraform`) an
//! image runs, and building a `FROM scratch` image from a static binary (`delegate sandbox
//! build-image`).
//!
//! Owns: the `io.delegate.binary` label contract (an image says which binary steps call) and the
//! build context of the scratch image. Must never: pull when the policy says `never`, or pull an
//! image that is present under `if-missing`.

use super::{PullPolicy, SandboxError};
use bollard::image::{BuildImageOptions, CreateImageOptions};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Image label naming the binary steps run (`tofu` or `terraform`).
pub const LABEL_BINARY: &str = "io.delegate.binary";
/// Image label holding the binary's version line, informational.
pub const LABEL_BINARY_VERSION: &str = "io.delegate.binary.version";
pub const DEFAULT_BINARY: &str = "tofu";

/// Which binary an image runs, from its labels; `tofu` when unlabelled. Only a plain name or an
/// absolute path of safe characters is accepted.
pub fn binary_from_labels(labels: Option<&HashMap<String, String>>) -> String {
    labels
        .and_then(|l| l.get(LABEL_BINARY))
        .filter(|b| {
            !b.is_empty()
                && b.len() <= 256
                && b.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
                && !b.split('/').any(|c| c == "..")
        })
        .cloned()
        .unwrap_or_else(|| DEFAULT_BINARY.to_string())
}

/// `tofu` or `terraform`: from the `version` output when there is one, else from the file name.
pub fn detect_binary(file_name: &str, version_output: Option<&str>) -> Option<&'static str> {
    if let Some(first) = version_output.and_then(|v| v.lines().next()) {
        if first.starts_with("OpenTofu") {
            return Some("tofu");
        }
        if first.starts_with("Terraform") {
            return Some("terraform");
        }
    }
    let lower = file_name.to_ascii_lowercase();
    if lower.starts_with("tofu") || lower.starts_with("opentofu") {
        Some("tofu")
    } else if lower.starts_with("terraform") {
        Some("terraform")
    } else {
        None
    }
}

/// Whether an ELF executable needs a dynamic loader (a `PT_INTERP` program header); such a binary
/// cannot run in a scratch image. `None` when the file is not a 64-bit little-endian ELF.
pub fn elf_is_dynamic(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    let field = |o: usize, n: usize| bytes.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| field(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| field(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| {
        field(o, 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = u16_at(0x36)?;
    let phnum = u16_at(0x38)?;
    for i in 0..phnum {
        let p_type = u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)?;
        if p_type == 3 {
            return Some(true);
        }
    }
    Some(false)
}

/// `repo[:tag]` or `repo@digest` into what the pull API wants (an empty tag pulls every tag).
pub fn split_image_ref(image: &str) -> (String, String) {
    if image.contains('@') {
        return (image.to_string(), String::new());
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (image[..at].to_string(), image[at + 1..].to_string())
        }
        None => (image.to_string(), "latest".to_string()),
    }
}

async fn image_present(docker: &Docker, image: &str) -> Result<bool, SandboxError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(source) => Err(SandboxError::Docker {
            op: "inspect image",
            source,
        }),
    }
}

async fn pull(docker: &Docker, image: &str) -> Result<(), SandboxError> {
    let (from_image, tag) = split_image_ref(image);
    let opts = CreateImageOptions {
        from_image,
        tag,
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(opts), None, None);
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(err) = info.error {
                    return Err(SandboxError::Pull {
                        image: image.into(),
                        message: err,
                    });
                }
            }
            Err(e) => {
                return Err(SandboxError::Pull {
                    image: image.into(),
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Make the image available according to the policy.
pub async fn ensure(docker: &Docker, image: &str, policy: PullPolicy) -> Result<(), SandboxError> {
    match policy {
        PullPolicy::Never => {
            if !image_present(docker, image).await? {
                return Err(SandboxError::ImageMissing {
                    image: image.into(),
                });
            }
        }
        PullPolicy::IfMissing => {
            if !image_present(docker, image).await? {
                pull(docker, image).await?;
            }
        }
        PullPolicy::Always => pull(docker, image).await?,
    }
    Ok(())
}

/// The binary the image's steps call.
pub async fn binary_of(docker: &Docker, image: &str) -> Result<String, SandboxError> {
    let inspect = docker
        .inspect_image(image)
        .await
        .map_err(|source| SandboxError::Docker {
            op: "inspect image",
            source,
        })?;
    Ok(binary_from_labels(
        inspect.config.as_ref().and_then(|c| c.labels.as_ref()),
    ))
}

const PASSWD: &str =
    "root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/tmp:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The docker build context (a tar) of the scratch image: the binary at `/bin/NAME`, minimal
/// passwd/group files, and the host's CA bundle when it has one (for provider registries).
pub fn build_context(
    name: &str,
    binary: &[u8],
    ca_bundle: Option<&[u8]>,
) -> std::io::Result<Vec<u8>> {
    let mut files: Vec<(String, &[u8], u32)> = vec![
        (format!("rootfs/bin/{name}"), binary, 0o755),
        ("rootfs/etc/passwd".into(), PASSWD.as_bytes(), 0o644),
        ("rootfs/etc/group".into(), GROUP.as_bytes(), 0o644),
    ];
    if let Some(ca) = ca_bundle {
        files.push(("rootfs/etc/ssl/certs/ca-certificates.crt".into(), ca, 0o644));
    }
    let dockerfile = "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nUSER 65534:65534\n";
    files.push(("Dockerfile".into(), dockerfile.as_bytes(), 0o644));
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, data)?;
    }
    b.into_inner()
}

async fn version_output(binary: &Path) -> Option<String> {
    let run = tokio::process::Command::new(binary)
        .arg("version")
        .env("CHECKPOINT_DISABLE", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `delegate sandbox build-image --from-binary PATH --tag TAG`.
pub async fn build_from_binary(
    binary: &Path,
    tag: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), SandboxError> {
    let bad = |reason: String| SandboxError::Binary {
        path: binary.display().to_string(),
        reason,
    };
    let bytes = tokio::fs::read(binary)
        .await
        .map_err(|e| bad(e.to_string()))?;
    match elf_is_dynamic(&bytes) {
        Some(false) => {}
        Some(true) => {
            return Err(bad(
                "it is dynamically linked; a FROM scratch image needs a static binary".into(),
            ))
        }
        None => return Err(bad("it is not a 64-bit Linux executable".into())),
    }
    let version = version_output(binary).await;
    let file_name = binary
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = detect_binary(&file_name, version.as_deref())
        .ok_or_else(|| bad("cannot tell whether it is tofu or terraform".into()))?;
    let ca = tokio::fs::read(CA_BUNDLE).await.ok();
    let context = build_context(name, &bytes, ca.as_deref()).map_err(|e| bad(e.to_string()))?;
    drop(bytes);

    let mut all_labels: HashMap<String, String> = labels.clone().into_iter().collect();
    all_labels.insert(LABEL_BINARY.into(), name.into());
    if let Some(line) = version.as_deref().and_then(|v| v.lines().next()) {
        all_labels.insert(
            LABEL_BINARY_VERSION.into(),
            line.trim().chars().take(200).collect(),
        );
    }
    let docker = super::connect_docker().await?;
    let opts = BuildImageOptions {
        dockerfile: "Dockerfile".to_string(),
        t: tag.to_string(),
        rm: true,
        forcerm: true,
        pull: false,
        labels: all_labels,
        ..Default::default()
    };
    let mut stream = docker.build_image(opts, None, Some(context.into()));
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(err) = info.error {
                    return Err(SandboxError::Build(err));
                }
            }
            Err(e) => return Err(SandboxError::Build(e.to_string())),
        }
    }
    if !image_present(&docker, tag).await? {
        return Err(SandboxError::Build(format!(
            "the build finished but `{tag}` is not present"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_label() {
        assert_eq!(binary_from_labels(None), "tofu");
        let mut l = HashMap::new();
        l.insert(LABEL_BINARY.to_string(), "terraform".to_string());
        assert_eq!(binary_from_labels(Some(&l)), "terraform");
        l.insert(LABEL_BINARY.to_string(), "/usr/local/bin/tofu".to_string());
        assert_eq!(binary_from_labels(Some(&l)), "/usr/local/bin/tofu");
        for bad in ["", "tofu; rm -rf /", "../../bin/sh", "a b"] {
            l.insert(LABEL_BINARY.to_string(), bad.to_string());
            assert_eq!(binary_from_labels(Some(&l)), "tofu", "{bad:?}");
        }
    }

    #[test]
    fn detects_binary_kind() {
        assert_eq!(
            detect_binary("x", Some("OpenTofu v1.8.0\non linux_amd64\n")),
            Some("tofu")
        );
        assert_eq!(
            detect_binary("tofu", Some("Terraform v1.11.4\n")),
            Some("terraform")
        );
        assert_eq!(detect_binary("terraform_1.11", None), Some("terraform"));
        assert_eq!(detect_binary("tofu", Some("")), Some("tofu"));
        assert_eq!(detect_binary("something", Some("garbage")), None);
    }

    #[test]
    fn elf_checks() {
        assert_eq!(elf_is_dynamic(b"#!/bin/sh\necho hi\n"), None);
        // A minimal ELF64 header with one program header of the given type.
        let elf = |p_type: u32| {
            let mut b = vec![0u8; 64 + 56];
            b[..4].copy_from_slice(b"\x7fELF");
            b[4] = 2;
            b[5] = 1;
            b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
            b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            b[64..68].copy_from_slice(&p_type.to_le_bytes());
            b
        };
        assert_eq!(elf_is_dynamic(&elf(1)), Some(false));
        assert_eq!(elf_is_dynamic(&elf(3)), Some(true));
        // Program headers pointing past the end: not a panic.
        let mut broken = elf(1);
        broken[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_is_dynamic(&broken), None);
        if let Ok(sh) = std::fs::read("/bin/sh") {
            assert_eq!(
                elf_is_dynamic(&sh),
                Some(true),
                "/bin/sh is dynamically linked here"
            );
        }
    }

    #[test]
    fn image_refs() {
        assert_eq!(
            split_image_ref("delegate-sandbox:local"),
            ("delegate-sandbox".into(), "local".into())
        );
        assert_eq!(
            split_image_ref("alpine"),
            ("alpine".into(), "latest".into())
        );
        assert_eq!(
            split_image_ref("registry.local:5000/tools/tofu"),
            ("registry.local:5000/tools/tofu".into(), "latest".into())
        );
        assert_eq!(
            split_image_ref("registry.local:5000/tools/tofu:1.8"),
            ("registry.local:5000/tools/tofu".into(), "1.8".into())
        );
        assert_eq!(
            split_image_ref("x@sha256:abc"),
            ("x@sha256:abc".into(), String::new())
        );
    }

    #[test]
    fn build_context_layout() {
        let ctx = build_context("terraform", b"\x7fELF...", Some(b"CA")).unwrap();
        let mut a = tar::Archive::new(&ctx[..]);
        let mut seen = BTreeMap::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            seen.insert(
                e.path().unwrap().display().to_string(),
                e.header().mode().unwrap(),
            );
        }
        assert_eq!(seen.get("rootfs/bin/terraform"), Some(&0o755));
        assert!(seen.contains_key("rootfs/etc/passwd"));
        assert!(seen.contains_key("rootfs/etc/ssl/certs/ca-certificates.crt"));
        assert!(seen.contains_key("Dockerfile"));
    }
}
