//! Provider mirrors for air-gapped pools: the tofu CLI configuration the agent writes into each
//! task so that `tofu init` installs providers only from the configured mirror.
//!
//! Owns the rendering (pure): from `[sandbox] provider_mirror` (a network mirror, HTTPS) or
//! `[sandbox] provider_filesystem_mirror` (a directory on the host, mounted read-only) to a
//! [`MirrorSetup`]: the file to write into the task's workspace volume, the environment variable
//! pointing tofu at it, and the read-only mount a filesystem mirror needs. The sandbox applies it
//! (`sandbox::Inner::execute`: the file goes into the workspace volume with the workspace, the
//! variables into every step's environment as the agent's own, which a task cannot override).
//!
//! The generated `provider_installation` block lists only the mirror: tofu uses no other
//! installation method (`direct` is not listed, so it is disabled), and a provider missing from
//! the mirror fails `init` with tofu's own message instead of reaching for the internet.
//!
//! Must never: emit a configuration that leaves `direct` installation possible, or accept a
//! mirror URL that is not HTTPS (tofu refuses plain HTTP network mirrors).

use std::path::{Path, PathBuf};

/// Where the CLI configuration goes inside the step containers (in the task's workspace volume,
/// under the agent's own `.delegate/` directory, written after the workspace is unpacked).
pub const CLI_CONFIG_PATH: &str = "/workspace/.delegate/tofu.tfrc";
/// The same file relative to the workspace volume's root.
pub const CLI_CONFIG_REL: &str = ".delegate/tofu.tfrc";
/// Where a filesystem mirror is mounted (read-only) inside the step containers.
pub const FS_MIRROR_MOUNT: &str = "/delegate/providers";

/// A configured provider mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderMirror {
    /// `provider_mirror`: the base URL of a network mirror, ending in `/`.
    Network(String),
    /// `provider_filesystem_mirror`: an absolute directory on the agent host.
    Filesystem(PathBuf),
}

/// What the sandbox must do for a task when a mirror is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSetup {
    /// Path of the CLI configuration inside the containers ([`CLI_CONFIG_PATH`]).
    pub file_path: String,
    /// The CLI configuration text.
    pub content: String,
    /// Variables to add to every step's environment: `TF_CLI_CONFIG_FILE`, and the same path as
    /// `TOFU_CLI_CONFIG_FILE` (a name some OpenTofu setups read), both reserved to the agent so a
    /// task can point tofu at neither a configuration of its own.
    pub env: Vec<(String, String)>,
    /// Read-only bind mounts: (host path, container path).
    pub ro_mounts: Vec<(PathBuf, String)>,
}

/// Check a network mirror URL and normalise it (a trailing `/`). Returns the message for the
/// config key on error.
pub fn parse_network_mirror(url: &str) -> Result<String, String> {
    // The messages never repeat the URL: it may carry a password or a token (the error names
    // the config key instead).
    let u = url.trim();
    let host_end = |rest: &str| rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = u
        .split_once("://")
        .map_or(u, |(_, rest)| &rest[..host_end(rest)]);
    if authority.contains('@') {
        return Err("must not carry user information (user:password@)".into());
    }
    let Some(rest) = u.strip_prefix("https://") else {
        return Err("must be an https:// URL (tofu accepts only HTTPS network mirrors)".into());
    };
    if rest[..host_end(rest)].is_empty() {
        return Err("has no host".into());
    }
    if u.contains(['?', '#']) {
        return Err("must not have a query or a fragment".into());
    }
    if u.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | '$' | '%'))
    {
        return Err("contains characters that do not belong in a mirror URL".into());
    }
    Ok(if u.ends_with('/') {
        u.to_string()
    } else {
        format!("{u}/")
    })
}

/// Check a filesystem mirror path.
pub fn parse_filesystem_mirror(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!(
            "{} must be an absolute path on the agent host",
            path.display()
        ));
    }
    let s = path.to_string_lossy();
    if s.contains([':', ',']) || s.chars().any(char::is_control) {
        return Err(format!(
            "{} cannot be mounted into a container (':' ',' and control characters are not allowed)",
            path.display()
        ));
    }
    Ok(path.to_path_buf())
}

/// An HCL string literal for `s` (quotes, backslashes and template sequences escaped).
fn hcl_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' | '%' if chars.peek() == Some(&'{') => {
                out.push(c);
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The CLI configuration text for a mirror.
pub fn render_cli_config(mirror: &ProviderMirror) -> String {
    let method = match mirror {
        ProviderMirror::Network(url) => {
            format!("  network_mirror {{\n    url = {}\n  }}\n", hcl_string(url))
        }
        ProviderMirror::Filesystem(_) => format!(
            "  filesystem_mirror {{\n    path = {}\n  }}\n",
            hcl_string(FS_MIRROR_MOUNT)
        ),
    };
    format!(
        "# Written by the delegate agent: providers come only from this mirror.\n\
         # No \"direct\" block: installing from the providers' origin registries is disabled.\n\
         provider_installation {{\n{method}}}\n"
    )
}

/// Everything the sandbox needs for a task under `mirror`.
pub fn setup(mirror: &ProviderMirror) -> MirrorSetup {
    let ro_mounts = match mirror {
        ProviderMirror::Network(_) => vec![],
        ProviderMirror::Filesystem(host) => vec![(host.clone(), FS_MIRROR_MOUNT.to_string())],
    };
    MirrorSetup {
        file_path: CLI_CONFIG_PATH.to_string(),
        content: render_cli_config(mirror),
        env: vec![
            ("TF_CLI_CONFIG_FILE".into(), CLI_CONFIG_PATH.into()),
            ("TOFU_CLI_CONFIG_FILE".into(), CLI_CONFIG_PATH.into()),
        ],
        ro_mounts,
    }
}

/// The `host:port` a network mirror is reached at (for the egress allowlist check).
pub fn mirror_destination(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 443,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), 443)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_mirror_config_lists_only_the_mirror() {
        let url = parse_network_mirror("https://mirror.internal:8443/providers").unwrap();
        assert_eq!(url, "https://mirror.internal:8443/providers/");
        let s = setup(&ProviderMirror::Network(url));
        assert_eq!(
            s.content,
            "# Written by the delegate agent: providers come only from this mirror.\n\
             # No \"direct\" block: installing from the providers' origin registries is disabled.\n\
             provider_installation {\n  network_mirror {\n    url = \"https://mirror.internal:8443/providers/\"\n  }\n}\n"
        );
        assert!(!s.content.contains("direct {"));
        assert_eq!(s.file_path, "/workspace/.delegate/tofu.tfrc");
        assert_eq!(
            s.env,
            vec![
                (
                    "TF_CLI_CONFIG_FILE".to_string(),
                    "/workspace/.delegate/tofu.tfrc".to_string()
                ),
                (
                    "TOFU_CLI_CONFIG_FILE".to_string(),
                    "/workspace/.delegate/tofu.tfrc".to_string()
                )
            ]
        );
        assert!(s.ro_mounts.is_empty());
    }

    #[test]
    fn filesystem_mirror_is_mounted_read_only_and_named_in_the_config() {
        let host = parse_filesystem_mirror(Path::new("/srv/tofu-providers")).unwrap();
        let s = setup(&ProviderMirror::Filesystem(host));
        assert!(s
            .content
            .contains("filesystem_mirror {\n    path = \"/delegate/providers\"\n  }"));
        assert!(!s.content.contains("network_mirror"));
        assert!(!s.content.contains("direct {"));
        assert_eq!(
            s.ro_mounts,
            vec![(
                PathBuf::from("/srv/tofu-providers"),
                "/delegate/providers".to_string()
            )]
        );
        assert_eq!(s.env[0].0, "TF_CLI_CONFIG_FILE");
    }

    #[test]
    fn bad_mirrors_are_refused() {
        for (bad, needle) in [
            ("http://mirror/", "https://"),
            ("mirror.internal/providers/", "https://"),
            ("https:///providers/", "no host"),
            ("https://u:p@mirror/", "user information"),
            ("http://u:p@mirror/", "user information"),
            ("https://mirror/p?token=s3cr3t", "query"),
            ("https://mirror/\"x", "characters"),
            ("https://mirror/${x}", "characters"),
        ] {
            let e = parse_network_mirror(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(!e.contains("u:p@") && !e.contains("s3cr3t"), "{e}");
        }
        assert!(parse_filesystem_mirror(Path::new("relative/dir")).is_err());
        assert!(parse_filesystem_mirror(Path::new("/a:b")).is_err());
    }

    #[test]
    fn hcl_strings_are_escaped() {
        assert_eq!(hcl_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(hcl_string("${x} %{y} $z"), "\"$${x} %%{y} $z\"");
    }

    #[test]
    fn destinations() {
        assert_eq!(
            mirror_destination("https://mirror.internal:8443/providers/"),
            Some(("mirror.internal".into(), 8443))
        );
        assert_eq!(
            mirror_destination("https://mirror.internal/providers/"),
            Some(("mirror.internal".into(), 443))
        );
        assert_eq!(
            mirror_destination("https://[fd00::1]:9443/p/"),
            Some(("fd00::1".into(), 9443))
        );
        assert_eq!(mirror_destination("http://x/"), None);
    }
}
