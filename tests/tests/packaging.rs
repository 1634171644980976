//! Packaging and service definitions, checked with the real tools:
//!
//! - `systemd/delegate.service`: `systemd-analyze verify` is clean (and flags broken copies),
//!   `systemd-analyze security --offline` scores it within the bound recorded in
//!   `systemd/README.md`, and it carries the settings the agent's notify/drain contract needs;
//! - `systemd/delegate.{sysusers,tmpfiles}` applied to a scratch root;
//! - the `.deb`: built with `packaging/build-deb.sh`, its contents and control data checked, then
//!   **installed on this machine with `dpkg -i`** (root needed), run, and purged again, pass or fail;
//! - the FROM-scratch agent and control plane images from `packaging/image/build.sh`;
//! - the compose example (`docker-compose config`) and the Kubernetes manifest (structure).
//!
//! The .deb test changes the machine (package `delegate-agent`, user `delegate`): it holds a file
//! lock while it does, purges a leftover install before it starts, and removes the user it created.

use delegate_tests::certs;
use delegate_tests::docker::Cleanup;
use delegate_tests::net::free_port;
use delegate_tests::process::bin;
use delegate_tests::{run_id, RUN_LABEL};
use serde_norway::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The highest overall exposure `systemd-analyze security` may give the unit. The measured value
/// is recorded in systemd/README.md; raising this bound needs a reason written there (it went from
/// 1.5 to 1.7 when the unit gained CAP_NET_ADMIN and AF_NETLINK for the egress host firewall and
/// lost ProcSubset=pid: measured 1.3 -> 1.6; back to 1.6, the measured score, when ProcSubset=pid
/// returned: systemd 252 still rounds the weighted figure to 1.6).
const MAX_EXPOSURE: f64 = 1.6;

/// The version every workspace crate shares.
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Run a command to completion; panics only when it cannot be started.
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn both(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        both(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command without any `DELEGATE_*` variable of the test environment.
fn clean_cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DELEGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// systemd unit
// ---------------------------------------------------------------------------------------------

const UNIT_EXEC_START: &str = "ExecStart=/usr/bin/delegate run --config /etc/delegate/agent.toml";

/// The unit's settings: key -> every value given, in order (comments and sections dropped).
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        map.entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    map
}

/// The unit with ExecStart pointed at the built `delegate` (verify wants an existing binary),
/// written as `delegate.service` in `dir`.
fn unit_copy(dir: &Path, text: &str) -> PathBuf {
    let delegate = bin("delegate");
    let rewritten = text.replace(
        "ExecStart=/usr/bin/delegate ",
        &format!("ExecStart={} ", delegate.display()),
    );
    let path = dir.join("delegate.service");
    std::fs::write(&path, rewritten).unwrap();
    path
}

/// `systemd-analyze verify`: Ok when it succeeds and prints nothing at all (systemd reports
/// unknown keys and bad values as warnings with a zero exit status).
fn verify_unit(text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = unit_copy(dir.path(), text);
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let said = both(&out);
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {said}", out.status))
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = read("systemd/delegate.service");
    assert!(
        unit.lines().any(|l| l == UNIT_EXEC_START),
        "the unit must start the packaged binary with the packaged config: {UNIT_EXEC_START}"
    );
    if let Err(e) = verify_unit(&unit) {
        panic!("systemd-analyze verify complains about systemd/delegate.service: {e}");
    }
}

#[test]
fn verify_check_catches_broken_units() {
    // The same check on damaged copies must fail, or the test above proves nothing.
    let unit = read("systemd/delegate.service");
    let damaged = [
        ("misspelt key", unit.replace("Type=notify", "Tpye=notify")),
        (
            "bad value",
            unit.replace("KillMode=mixed", "KillMode=sometimes"),
        ),
        (
            "bad duration",
            unit.replace("WatchdogSec=30s", "WatchdogSec=half"),
        ),
        (
            "missing binary",
            unit.replace(
                "ExecStart=/usr/bin/delegate ",
                "ExecStart=/nonexistent/delegate ",
            ),
        ),
    ];
    for (what, text) in damaged {
        assert_ne!(text, unit, "{what}: the damage did not apply");
        assert!(
            verify_unit(&text).is_err(),
            "systemd-analyze verify accepted a unit with a {what}"
        );
    }
}

/// The overall exposure from `systemd-analyze security` output.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let after = line.split(": ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn unit_security_exposure_is_within_the_recorded_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = unit_copy(dir.path(), &read("systemd/delegate.service"));
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path));
    let report = both(&out);
    assert!(out.status.success(), "systemd-analyze security: {report}");
    let score = exposure(&report).unwrap_or_else(|| panic!("no overall exposure in: {report}"));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} is above {MAX_EXPOSURE}:\n{report}"
    );
    let recorded = format!("Overall exposure level: {score:.1}");
    assert!(
        read("systemd/README.md").contains(&recorded),
        "systemd/README.md must record the current score ({recorded}):\n{report}"
    );
}

#[test]
fn exposure_parser_reads_systemd_output() {
    let sample = "✗ PrivateNetwork=   Service has access to the host's network   0.5\n\
                  \n→ Overall exposure level for delegate.service: 1.3 OK 🙂\n";
    assert_eq!(exposure(sample), Some(1.3));
    assert_eq!(exposure("nothing here"), None);
}

#[test]
fn unit_matches_the_agent_contract() {
    let s = unit_settings(&read("systemd/delegate.service"));
    let one = |k: &str| -> String {
        match s.get(k).map(Vec::as_slice) {
            Some([v]) => v.clone(),
            other => panic!("{k} must be set exactly once, found {other:?}"),
        }
    };
    // The agent's side of the notify protocol and of stop/reload.
    for (k, v) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("RestartSec", "5s"),
        ("KillMode", "mixed"),
        ("TimeoutStopSec", "15min"),
        ("User", "delegate"),
        ("Group", "delegate"),
        ("SupplementaryGroups", "docker"),
        ("StateDirectory", "delegate"),
        ("ConfigurationDirectory", "delegate"),
        ("UMask", "0077"),
        // The egress host firewall (nft/iptables run by the agent) and nothing else.
        ("CapabilityBoundingSet", "CAP_NET_ADMIN"),
        ("AmbientCapabilities", "CAP_NET_ADMIN"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("DevicePolicy", "closed"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
        ("SystemCallArchitectures", "native"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    assert_eq!(
        s.get("SystemCallFilter").map(Vec::as_slice),
        Some(
            &[
                "@system-service".to_string(),
                "~@privileged @resources".to_string()
            ][..]
        )
    );
    // No IP policy by default (the control plane's address is site-specific): only as a comment.
    assert!(!s.contains_key("IPAddressDeny"));
    // ProcSubset=pid hides /proc/net (and /proc/sys): the agent must read the host's addresses
    // from /proc/self/net, or every task fails under the unit ("cannot read the host's addresses").
    let local = read("agent/src/egress/local.rs");
    assert!(
        !local.contains("\"/proc/net/") && local.contains("\"/proc/self/net/"),
        "ProcSubset=pid hides /proc/net: agent/src/egress/local.rs must read /proc/self/net"
    );
    // The egress firewall is on by default under systemd: the packaged config does not turn it off.
    let example: toml::Table = read("packaging/deb/agent.toml").parse().unwrap();
    assert!(
        example
            .get("egress")
            .and_then(|e| e.get("firewall"))
            .is_none(),
        "the packaged agent.toml leaves egress.firewall at auto"
    );
}

/// The drop-in systemd/README.md gives for `[egress] firewall = "off"` takes the capability and
/// netlink away again, and the unit then scores lower.
#[test]
fn the_firewall_off_drop_in_removes_the_capability() {
    let readme = read("systemd/README.md");
    let start = readme
        .find("# systemctl edit delegate\n[Service]\nCapabilityBoundingSet=\n")
        .expect("the firewall-off drop-in in systemd/README.md");
    let drop_in: Vec<&str> = readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| !l.starts_with("```"))
        .collect();
    let unit = read("systemd/delegate.service");
    let with_drop_in = unit.replace(
        "\n[Install]",
        &format!("\n{}\n\n[Install]", drop_in.join("\n")),
    );
    assert_ne!(with_drop_in, unit);
    if let Err(e) = verify_unit(&with_drop_in) {
        panic!("the unit with the firewall-off drop-in: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let score = |text: &str| -> (f64, String) {
        let path = unit_copy(dir.path(), text);
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&path));
        let report = both(&out);
        (exposure(&report).unwrap(), report)
    };
    let (with, _) = score(&unit);
    let (without, report) = score(&with_drop_in);
    assert!(without < with, "{without} !< {with}");
    for gone in ["CAP_NET_ADMIN", "AmbientCapabilities=", "AF_NETLINK"] {
        assert!(
            !report
                .lines()
                .any(|l| l.starts_with('✗') && l.contains(gone)),
            "{gone} still reported with the drop-in:\n{report}"
        );
    }
}

#[test]
fn unit_sysusers_tmpfiles_and_example_config_agree() {
    let sysusers = read("systemd/delegate.sysusers");
    let rows: Vec<Vec<&str>> = sysusers
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.iter().any(|r| r[..2] == ["u", "delegate"]),
        "{sysusers}"
    );
    assert!(
        rows.iter().any(|r| r[..] == ["m", "delegate", "docker"]),
        "{sysusers}"
    );

    let tmpfiles = read("systemd/delegate.tmpfiles");
    assert!(
        tmpfiles
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "d",
                    "/var/lib/delegate",
                    "0700",
                    "delegate",
                    "delegate",
                    "-"
                ]),
        "{tmpfiles}"
    );

    // The example config keeps everything the agent writes in the StateDirectory, the only
    // writable place under ProtectSystem=strict (certificate renewal writes cert_file).
    let cfg: toml::Table = read("packaging/deb/agent.toml").parse().unwrap();
    assert_eq!(cfg["data_dir"].as_str(), Some("/var/lib/delegate"));
    for key in ["ca_file", "cert_file", "key_file"] {
        let p = cfg["control_plane"][key].as_str().unwrap();
        assert!(
            p.starts_with("/var/lib/delegate/"),
            "control_plane.{key} = {p}"
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_private_state_dir() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for (src, dir) in [
        ("systemd/delegate.sysusers", "usr/lib/sysusers.d"),
        ("systemd/delegate.tmpfiles", "usr/lib/tmpfiles.d"),
    ] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
        std::fs::copy(repo().join(src), r.join(dir).join("delegate.conf")).unwrap();
    }
    std::fs::create_dir_all(r.join("etc")).unwrap();
    ok(Command::new("systemd-sysusers")
        .arg(format!("--root={}", r.display()))
        .arg("delegate.conf"));
    ok(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", r.display()))
        .args(["--create", "delegate.conf"]));

    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("delegate:"))
        .unwrap_or_else(|| panic!("no delegate user in {passwd}"))
        .split(':')
        .collect();
    assert_eq!(user[5], "/var/lib/delegate");
    assert!(user[6].ends_with("nologin"), "{user:?}");
    let group = std::fs::read_to_string(r.join("etc/group")).unwrap();
    let docker = group
        .lines()
        .find(|l| l.starts_with("docker:"))
        .unwrap_or_else(|| panic!("no docker group in {group}"));
    assert!(
        docker
            .rsplit(':')
            .next()
            .unwrap()
            .split(',')
            .any(|m| m == "delegate"),
        "{docker}"
    );
    let meta = std::fs::metadata(r.join("var/lib/delegate")).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    assert_eq!(meta.uid().to_string(), user[2]);
    assert_eq!(meta.gid().to_string(), user[3]);
}

// ---------------------------------------------------------------------------------------------
// .deb
// ---------------------------------------------------------------------------------------------

/// An exclusive lock across processes (two test runs must not install and purge the same
/// package at once). Held by a `flock` child that keeps it while our pipe to it is open, so it is
/// released even if this process dies.
struct MachineLock {
    child: Child,
}

impl MachineLock {
    fn take(name: &str) -> MachineLock {
        let path = std::env::temp_dir().join(format!("{name}.lock"));
        let mut child = Command::new("flock")
            .arg("-x")
            .arg(&path)
            .args(["-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run flock (util-linux)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked", "flock on {}", path.display());
        MachineLock { child }
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

const PKG: &str = "delegate-agent";

fn pkg_installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f", "${Status}", PKG]))
        .stdout
        .starts_with(b"install ok installed")
}

fn purge() -> Output {
    run(Command::new("dpkg").args(["--purge", PKG]))
}

/// `getent passwd delegate` fields, if the user exists.
fn delegate_user() -> Option<Vec<String>> {
    let out = run(Command::new("getent").args(["passwd", "delegate"]));
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(':')
            .map(str::to_string)
            .collect()
    })
}

/// Purges the package and removes the user the package created, pass or fail.
struct Installed {
    remove_user: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let out = purge();
        if !out.status.success() {
            eprintln!("dpkg --purge {PKG} failed: {}", both(&out));
        }
        if self.remove_user {
            let _ = run(Command::new("userdel").arg("delegate"));
            let _ = run(Command::new("groupdel").arg("delegate"));
        }
    }
}

/// `dpkg-deb -c`: path -> (mode string, owner) for regular files.
fn deb_files(deb: &Path) -> BTreeMap<String, (String, String)> {
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f[f.len() - 1].trim_start_matches('.').to_string();
            (path, (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}

fn field(deb: &Path, name: &str) -> String {
    ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
        .trim()
        .to_string()
}

/// Lines of a maintainer script that are not comments.
fn code_lines(script: &str) -> Vec<&str> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn deb_builds_installs_runs_and_purges() {
    assert_eq!(
        ok(Command::new("id").arg("-u")).trim(),
        "0",
        "installing the .deb needs root (CI runs as root)"
    );
    let _lock = MachineLock::take("delegate-packaging-deb");
    if pkg_installed() {
        // Left by an interrupted earlier run: start from a clean machine.
        let out = purge();
        assert!(
            out.status.success(),
            "purging a leftover {PKG}: {}",
            both(&out)
        );
    }

    // Build.
    let out_dir = tempfile::tempdir().unwrap();
    let stdout = ok(Command::new(repo().join("packaging/build-deb.sh")).arg(out_dir.path()));
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(deb.is_file(), "build-deb.sh printed {stdout:?}");
    assert!(
        deb.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{PKG}_{VERSION}-")),
        "{}",
        deb.display()
    );

    // Contents: exactly these files, root-owned, with these modes.
    let files = deb_files(&deb);
    let expected: BTreeMap<&str, &str> = [
        ("/usr/bin/delegate", "-rwxr-xr-x"),
        ("/lib/systemd/system/delegate.service", "-rw-r--r--"),
        ("/usr/lib/sysusers.d/delegate.conf", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/delegate.conf", "-rw-r--r--"),
        ("/etc/delegate/agent.toml", "-rw-r-----"),
        ("/usr/share/doc/delegate-agent/README.md", "-rw-r--r--"),
        ("/usr/share/doc/delegate-agent/systemd.md", "-rw-r--r--"),
        ("/usr/share/doc/delegate-agent/copyright", "-rw-r--r--"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        files.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected.keys().copied().collect::<BTreeSet<_>>(),
        "files in the .deb"
    );
    for (path, (mode, owner)) in &files {
        assert_eq!(mode, expected[path.as_str()], "mode of {path}");
        assert_eq!(owner, "0/0", "owner of {path}");
    }
    // The packaged files are the repository's.
    let unpacked = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(unpacked.path()));
    for (src, dest) in [
        (
            "systemd/delegate.service",
            "lib/systemd/system/delegate.service",
        ),
        (
            "systemd/delegate.sysusers",
            "usr/lib/sysusers.d/delegate.conf",
        ),
        (
            "systemd/delegate.tmpfiles",
            "usr/lib/tmpfiles.d/delegate.conf",
        ),
        ("packaging/deb/agent.toml", "etc/delegate/agent.toml"),
    ] {
        assert_eq!(
            std::fs::read_to_string(unpacked.path().join(dest)).unwrap(),
            read(src),
            "{dest} differs from {src}"
        );
    }

    // Control data.
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/delegate/agent.toml");
    assert_eq!(field(&deb, "Package"), PKG);
    assert_eq!(field(&deb, "Version"), format!("{VERSION}-1"));
    assert_eq!(field(&deb, "Recommends"), "docker.io | docker-ce");
    let depends = field(&deb, "Depends");
    assert!(depends.contains("libc6"), "{depends}");
    assert!(depends.contains("systemd-sysusers"), "{depends}");
    // The egress host firewall's tool (the unit grants CAP_NET_ADMIN for it).
    assert!(depends.contains("nftables | iptables"), "{depends}");
    assert!(
        !depends.contains("docker"),
        "Docker is recommended, not required: {depends}"
    );
    let postinst = ok(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("postinst"));
    let code = code_lines(&postinst);
    assert!(
        code.iter().any(|l| l.starts_with("systemd-sysusers")),
        "{postinst}"
    );
    assert!(
        code.iter()
            .any(|l| l.starts_with("systemd-tmpfiles --create")),
        "{postinst}"
    );
    for never in [
        "systemctl enable",
        "systemctl start",
        "systemctl restart",
        "--now",
    ] {
        assert!(
            !code.iter().any(|l| l.contains(never)),
            "postinst must not enable or start the service ({never}):\n{postinst}"
        );
    }

    // Install on this machine.
    let guard = Installed {
        remove_user: delegate_user().is_none(),
    };
    let out = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(out.status.success(), "dpkg -i: {}", both(&out));
    assert!(pkg_installed());

    let user = delegate_user().expect("postinst created the delegate user");
    let (uid, gid): (u32, u32) = (user[2].parse().unwrap(), user[3].parse().unwrap());
    assert_ne!(uid, 0);
    let groups = ok(Command::new("id").args(["-nG", "delegate"]));
    assert!(
        groups.split_whitespace().any(|g| g == "docker"),
        "delegate is not in the docker group: {groups}"
    );
    let state = std::fs::metadata("/var/lib/delegate").expect("/var/lib/delegate exists");
    assert_eq!(state.permissions().mode() & 0o7777, 0o700);
    assert_eq!((state.uid(), state.gid()), (uid, gid));
    let conf = std::fs::metadata("/etc/delegate/agent.toml").unwrap();
    assert_eq!(conf.permissions().mode() & 0o7777, 0o640);
    assert_eq!(
        (conf.uid(), conf.gid()),
        (0, gid),
        "agent.toml is root:delegate"
    );
    assert!(Path::new("/lib/systemd/system/delegate.service").is_file());

    // Run the installed binary.
    let version = ok(clean_cmd("/usr/bin/delegate").arg("version"));
    assert!(
        version.contains(VERSION),
        "delegate version printed {version:?}"
    );

    // The shipped example is complete except for what enrollment creates: `config check`, run as
    // the service user, fails and names exactly the three missing files.
    let check = || {
        run(clean_cmd("runuser").args([
            "-u",
            "delegate",
            "--",
            "/usr/bin/delegate",
            "config",
            "check",
            "--config",
            "/etc/delegate/agent.toml",
        ]))
    };
    let out = check();
    let said = both(&out);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "config check must fail cleanly before enrollment ({}): {said}",
        out.status
    );
    for (key, file) in [
        ("control_plane.ca_file", "/var/lib/delegate/tls/ca.pem"),
        ("control_plane.cert_file", "/var/lib/delegate/tls/agent.pem"),
        ("control_plane.key_file", "/var/lib/delegate/tls/agent.key"),
    ] {
        assert!(
            said.contains(key),
            "config check does not name {key}: {said}"
        );
        assert!(
            said.contains(file),
            "config check does not name {file}: {said}"
        );
    }
    // Every "key: message" line names one of the three files, and nothing else is reported.
    let keys: BTreeSet<&str> = said
        .lines()
        .filter_map(|l| l.trim().split_once(": ").map(|(k, _)| k))
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        })
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "control_plane.ca_file",
            "control_plane.cert_file",
            "control_plane.key_file"
        ]),
        "the example config must fail only on the files enrollment creates: {said}"
    );

    // With the files enrollment would write (owned by the service user, key 0600), it passes.
    let ca = certs::new_ca("packaging test CA");
    let leaf = certs::client_cert(&ca, "runner-1", false);
    let tls = Path::new("/var/lib/delegate/tls");
    std::fs::create_dir_all(tls).unwrap();
    std::fs::set_permissions(tls, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(tls, Some(uid), Some(gid)).unwrap();
    for (name, pem, mode) in [
        ("ca.pem", ca.0.pem(), 0o644),
        ("agent.pem", leaf.cert_pem.clone(), 0o644),
        ("agent.key", leaf.key_pem.clone(), 0o600),
    ] {
        let p = tls.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(pem.as_bytes()).unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
    }
    let out = check();
    assert!(
        out.status.success(),
        "config check with the enrollment files in place: {}",
        both(&out)
    );

    // Purge removes what the package put on the machine (the user stays, per Debian policy;
    // the guard removes it because this test created it).
    let out = purge();
    assert!(out.status.success(), "dpkg --purge: {}", both(&out));
    assert!(!pkg_installed());
    for gone in [
        "/usr/bin/delegate",
        "/lib/systemd/system/delegate.service",
        "/etc/delegate/agent.toml",
        "/var/lib/delegate",
    ] {
        assert!(
            !Path::new(gone).exists(),
            "{gone} is still there after purge"
        );
    }
    let overrides = ok(Command::new("dpkg-statoverride").arg("--list"));
    assert!(!overrides.contains("/etc/delegate"), "{overrides}");
    drop(guard);
}

// ---------------------------------------------------------------------------------------------
// Container images
// ---------------------------------------------------------------------------------------------

/// Removes the listed image tags when dropped.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = run(Command::new("docker").args(["rmi", "-f"]).args(&self.0));
        }
    }
}

fn inspect(tag: &str) -> serde_json::Value {
    let out = ok(Command::new("docker").args(["image", "inspect", tag]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

fn build_image(bin_name: &str, tag: &str) {
    let stdout = ok(Command::new(repo().join("packaging/image/build.sh"))
        .args(["--bin", bin_name, "--tag", tag]));
    assert_eq!(stdout.lines().last().map(str::trim), Some(tag), "{stdout}");
}

/// Checks an image is the two COPY layers of the scratch Dockerfile, non-root, with `entrypoint`.
fn assert_scratch_non_root(tag: &str, entrypoint: &str) {
    let img = inspect(tag);
    let cfg = &img["Config"];
    assert_eq!(cfg["User"], "10001:10001", "{cfg}");
    assert_eq!(cfg["Entrypoint"], serde_json::json!([entrypoint]), "{cfg}");
    // FROM scratch: the image's layers are exactly its own two COPY steps, no base image.
    let layers = img["RootFS"]["Layers"].as_array().map(Vec::len);
    assert_eq!(layers, Some(2), "{}", img["RootFS"]);
    assert_eq!(
        cfg["Labels"]["org.opencontainers.image.version"], VERSION,
        "{cfg}"
    );
}

#[test]
fn images_build_from_scratch_and_run_the_compose_example_end_to_end() {
    let rid = run_id();
    let _cleanup = Cleanup::new(&rid);
    let agent_tag = format!("delegate-agent:test-{rid}");
    let cp_tag = format!("delegate-cp:test-{rid}");
    let _images = Images(vec![agent_tag.clone(), cp_tag.clone()]);
    build_image("delegate", &agent_tag);
    build_image("delegate-cp", &cp_tag);

    assert_scratch_non_root(&agent_tag, "/usr/bin/delegate");
    let cfg = inspect(&agent_tag)["Config"].clone();
    assert_eq!(
        cfg["Cmd"],
        serde_json::json!(["run", "--config", "/etc/delegate/agent.toml"])
    );
    assert_scratch_non_root(&cp_tag, "/usr/bin/delegate-cp");

    let label = format!("{RUN_LABEL}={rid}");
    let docker_run = |args: &[&str]| -> Output {
        run(Command::new("docker")
            .args([
                "run",
                "--rm",
                "--label",
                &label,
                "--read-only",
                "--cap-drop",
                "ALL",
            ])
            .args(args))
    };
    let out = docker_run(&[&agent_tag, "version"]);
    assert!(
        out.status.success(),
        "docker run {agent_tag} version: {}",
        both(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(VERSION),
        "{}",
        both(&out)
    );

    // The compose README's steps: the control plane image (uid 10001) initialises a data dir the
    // operator gave to uid 10001, with an agent bundle; the agent image (same uid) mounts that
    // bundle read-only as /etc/delegate, as the compose file does, and finds it valid.
    let agent_name = format!("sidecar-{rid}");
    let host = tempfile::tempdir().unwrap();
    let data = host.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(10001), Some(10001)).unwrap();
    let data_mount = format!("{}:/data", data.display());
    let out = docker_run(&[
        "-v",
        &data_mount,
        &cp_tag,
        "init",
        "--data-dir",
        "/data",
        "--san",
        "controlplane",
        "--agent-listen",
        "0.0.0.0:8443",
        "--api-listen",
        "0.0.0.0:8444",
        "--agent",
        &agent_name,
    ]);
    assert!(
        out.status.success(),
        "delegate-cp init in its image: {}",
        both(&out)
    );
    let bundle = data.join("agents").join(&agent_name);
    let agent_toml = std::fs::read_to_string(bundle.join("agent.toml")).unwrap();
    assert!(
        agent_toml.contains("wss://controlplane:8443/v1/agent"),
        "the bundle points at the compose service name: {agent_toml}"
    );
    let bundle_mount = format!("{}:/etc/delegate:ro", bundle.display());
    let out = docker_run(&[
        "-v",
        &bundle_mount,
        &agent_tag,
        "config",
        "check",
        "--config",
        "/etc/delegate/agent.toml",
    ]);
    assert!(
        out.status.success(),
        "the agent image cannot use the bundle the control plane image wrote: {}",
        both(&out)
    );

    // The compose example itself, with these images: the agent connects and runs a plan.
    let sandbox = delegate_tests::docker::sandbox_image();
    std::fs::copy(
        repo().join("packaging/compose/docker-compose.yml"),
        host.path().join("docker-compose.yml"),
    )
    .unwrap();
    let socket_gid = std::fs::metadata("/var/run/docker.sock").unwrap().gid();
    let env_file = host.path().join("test.env");
    std::fs::write(
        &env_file,
        format!(
            "DOCKER_GID={socket_gid}\nAGENT_NAME={agent_name}\nDELEGATE_CP_IMAGE={cp_tag}\n\
             DELEGATE_AGENT_IMAGE={agent_tag}\nDELEGATE_SANDBOX_IMAGE={sandbox}\n\
             DELEGATE_AGENT_PORT={}\nDELEGATE_API_PORT={}\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let project = Compose {
        dir: host.path().to_path_buf(),
        env_file,
        project: format!("delegate-{rid}").to_lowercase(),
        agent_name: agent_name.clone(),
    };
    let out = run(project.cmd().args(["up", "-d"]));
    assert!(out.status.success(), "compose up: {}", both(&out));
    let cp_cli = |args: &[&str]| -> Output {
        run(project
            .cmd()
            .args(["exec", "-T", "controlplane", "delegate-cp"])
            .args(args))
    };
    wait_for(&format!("{agent_name} connected"), || {
        let out = cp_cli(&["agents", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let connected = v.as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["name"] == agent_name.as_str() && x["state"] == "connected")
        });
        (connected, format!("{v} {}", project.logs()))
    });
    copy_tree(&repo().join("examples/hello"), &data.join("ws-hello"));
    chown_tree(&data.join("ws-hello"), 10001);
    let out = cp_cli(&["submit", "/data/ws-hello", "--op", "plan", "--json"]);
    assert!(out.status.success(), "submit: {}", both(&out));
    let submitted: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("submit --json printed no JSON ({e}): {}", both(&out)));
    let task = submitted["id"].as_str().expect("task id").to_string();
    let mut last = serde_json::Value::Null;
    wait_for("the plan to finish", || {
        let out = cp_cli(&["show", &task, "--json"]);
        last = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (
            !last["outcome"].is_null(),
            format!("{last} {}", project.logs()),
        )
    });
    assert_eq!(
        last["outcome"],
        "succeeded",
        "the plan through the compose sidecar: {last}\n{}",
        project.logs()
    );
}

/// A compose project in a temp dir; `down -v` when dropped, and removal of any sandbox object the
/// agent left behind.
struct Compose {
    dir: PathBuf,
    env_file: PathBuf,
    project: String,
    agent_name: String,
}

impl Compose {
    fn cmd(&self) -> Command {
        let mut c = compose();
        c.current_dir(&self.dir)
            .env_remove("DOCKER_GID")
            .arg("-p")
            .arg(&self.project)
            .arg("--env-file")
            .arg(&self.env_file)
            .arg("-f")
            .arg(self.dir.join("docker-compose.yml"));
        c
    }

    fn logs(&self) -> String {
        both(&run(self.cmd().args([
            "logs",
            "--no-color",
            "--tail",
            "40",
        ])))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- compose logs ----\n{}", self.logs());
        }
        let _ = run(self.cmd().args(["down", "-v", "--timeout", "30"]));
        let filter = format!("label=io.delegate.agent={}", self.agent_name);
        let kinds: [(&[&str], &[&str]); 3] = [
            (&["ps", "-aq"], &["rm", "-f", "-v"]),
            (&["network", "ls", "-q"], &["network", "rm"]),
            (&["volume", "ls", "-q"], &["volume", "rm", "-f"]),
        ];
        for (list, remove) in kinds {
            let out = run(Command::new("docker")
                .args(list)
                .args(["--filter", &filter]));
            let ids = String::from_utf8_lossy(&out.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = run(Command::new("docker").args(remove).args(&ids));
            }
        }
    }
}

/// Poll `check` (which returns whether it holds and a description of the state) until it holds;
/// a liveness bound, not a performance assertion.
fn wait_for(what: &str, mut check: impl FnMut() -> (bool, String)) {
    let start = std::time::Instant::now();
    loop {
        let (done, state) = check();
        if done {
            return;
        }
        if start.elapsed() > std::time::Duration::from_secs(180) {
            panic!("timed out waiting for {what}: {state}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::chown(path, Some(id), Some(id)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compose and Kubernetes
// ---------------------------------------------------------------------------------------------

fn yaml_docs(text: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| Yaml::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn strs(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `docker compose` (v2) or `docker-compose` (v1).
fn compose() -> Command {
    let v2 = run(Command::new("docker").args(["compose", "version"]));
    if v2.status.success() {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    }
}

#[test]
fn compose_file_is_valid_and_runs_the_agent_locked_down() {
    let file = repo().join("packaging/compose/docker-compose.yml");
    let env_dir = tempfile::tempdir().unwrap();
    let with_gid = env_dir.path().join("with-gid.env");
    let without = env_dir.path().join("empty.env");
    std::fs::write(&with_gid, "DOCKER_GID=105\n").unwrap();
    std::fs::write(&without, "").unwrap();
    let config = |env_file: &Path| {
        run(compose()
            .env_remove("DOCKER_GID")
            .arg("--env-file")
            .arg(env_file)
            .arg("-f")
            .arg(&file)
            .args(["config", "-q"]))
    };
    let out = config(&with_gid);
    assert!(out.status.success(), "compose config: {}", both(&out));
    let out = config(&without);
    assert!(
        !out.status.success(),
        "compose accepted a missing DOCKER_GID"
    );
    assert!(both(&out).contains("DOCKER_GID"), "{}", both(&out));

    let doc = yaml_docs(&read("packaging/compose/docker-compose.yml")).remove(0);
    let cp = &doc["services"]["controlplane"];
    assert_eq!(
        strs(&cp["command"]),
        ["serve", "--data-dir", "/data"],
        "control plane command"
    );
    let agent = &doc["services"]["agent"];
    assert_eq!(
        strs(&agent["command"]),
        ["run", "--config", "/etc/delegate/agent.toml"]
    );
    let volumes = strs(&agent["volumes"]);
    assert!(
        volumes
            .iter()
            .any(|v| v == "/var/run/docker.sock:/var/run/docker.sock"),
        "{volumes:?}"
    );
    assert!(
        volumes.iter().any(|v| v.ends_with(":/etc/delegate:ro")),
        "the agent's config and certificates are mounted read-only: {volumes:?}"
    );
    assert!(strs(&agent["group_add"])
        .iter()
        .any(|g| g.contains("DOCKER_GID")));
    assert_eq!(strs(&agent["cap_drop"]), ["ALL"]);
    assert_eq!(agent["read_only"].as_bool(), Some(true));
    assert!(strs(&agent["security_opt"]).contains(&"no-new-privileges:true".to_string()));
    assert!(
        agent["user"].is_null() || agent["user"].as_str() != Some("root"),
        "the agent must keep the image's non-root user"
    );
    assert_eq!(agent["stop_grace_period"].as_str(), Some("15m"));
    assert!(agent["privileged"].is_null());
    // No nft/iptables in the image and no capabilities: the per-task host firewall is off, and
    // the README says what isolates the task bridges instead.
    assert_eq!(
        agent["environment"]["DELEGATE_EGRESS__FIREWALL"].as_str(),
        Some("off")
    );
    assert!(read("packaging/compose/README.md").contains("node-firewall.nft"));
}

/// The node-level rules the container layouts (firewall off) rely on are valid nftables.
#[test]
fn node_firewall_rules_pass_nft_check() {
    let out = run(Command::new("nft")
        .arg("-c")
        .arg("-f")
        .arg(repo().join("packaging/k8s/node-firewall.nft")));
    assert!(
        out.status.success(),
        "nft -c -f packaging/k8s/node-firewall.nft (needs nftables and root): {}",
        both(&out)
    );
}

/// "10m" / "90s" / "1h" to seconds (the forms the manifests use).
fn seconds(d: &str) -> u64 {
    let (n, unit) = d.split_at(d.len() - 1);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {d:?}"));
    match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => panic!("duration {d:?}"),
    }
}

fn assert_locked_down(c: &Yaml) {
    let name = c["name"].as_str().unwrap_or("?");
    let sc = &c["securityContext"];
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{name}"
    );
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{name}");
    assert_ne!(sc["privileged"].as_bool(), Some(true), "{name}");
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
    assert!(sc["capabilities"]["add"].is_null(), "{name}");
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                !c["resources"][kind][res].is_null(),
                "{name}: resources.{kind}.{res}"
            );
        }
    }
}

#[test]
fn kubernetes_runner_pool_is_structurally_sound() {
    let docs = yaml_docs(&read("packaging/k8s/runner-pool.yaml"));
    let find = |kind: &str| -> Vec<&Yaml> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    for d in &docs {
        if d["kind"].as_str() != Some("Namespace") {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some("delegate"),
                "{d:?}"
            );
        }
    }
    let deployment = find("Deployment");
    assert_eq!(deployment.len(), 1);
    let dep = deployment[0];
    assert!(
        dep["spec"]["replicas"].as_u64().unwrap_or(0) >= 2,
        "replicas"
    );
    let tpl = &dep["spec"]["template"];
    assert_eq!(
        dep["spec"]["selector"]["matchLabels"], tpl["metadata"]["labels"],
        "selector matches the pod labels"
    );
    let pod = &tpl["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(10001));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    // The node's network namespace, because the agent serves each task's state backend on its
    // Docker network's gateway (as the compose sidecar does); no other host namespace.
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    for host in ["hostPID", "hostIPC"] {
        assert_ne!(pod[host].as_bool(), Some(true), "{host}");
    }

    let containers = pod["containers"].as_sequence().unwrap();
    let inits = pod["initContainers"].as_sequence().unwrap();
    for c in containers.iter().chain(inits) {
        assert_locked_down(c);
    }
    let agent = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("agent"))
        .expect("an agent container");
    assert_eq!(
        strs(&agent["args"]),
        ["run", "--config", "/etc/delegate/agent.toml"]
    );
    let scratch = tempfile::tempdir().unwrap();
    for probe in ["readinessProbe", "livenessProbe"] {
        let cmd = strs(&agent[probe]["exec"]["command"]);
        assert_eq!(
            cmd.first().map(String::as_str),
            Some("/usr/bin/delegate"),
            "{probe} runs the agent's own check"
        );
        assert!(
            cmd.contains(&"/etc/delegate/agent.toml".to_string()),
            "{probe}"
        );
        assert!(agent[probe]["periodSeconds"].as_u64().is_some(), "{probe}");
        // The built agent accepts these arguments: a missing config is a failing check (1), not
        // a usage error (2), which would fail the probe forever.
        let missing = scratch.path().join("agent.toml");
        let args: Vec<String> = cmd[1..]
            .iter()
            .map(|a| {
                if a == "/etc/delegate/agent.toml" {
                    missing.display().to_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        let out = run(clean_cmd(bin("delegate")).args(&args));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{probe} {args:?}: {}",
            both(&out)
        );
        assert!(both(&out).contains("FAIL  config"), "{}", both(&out));
    }

    // Volumes: every mount names a declared volume; the socket is a hostPath of type Socket.
    let volumes: BTreeMap<&str, &Yaml> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let mounts: BTreeMap<&str, &str> = agent["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap(),
                m["name"].as_str().unwrap(),
            )
        })
        .collect();
    for c in containers.iter().chain(inits) {
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            let n = m["name"].as_str().unwrap();
            assert!(volumes.contains_key(n), "mount of undeclared volume {n}");
        }
    }
    let sock = volumes[mounts["/var/run/docker.sock"]];
    assert_eq!(
        sock["hostPath"]["path"].as_str(),
        Some("/var/run/docker.sock")
    );
    assert_eq!(sock["hostPath"]["type"].as_str(), Some("Socket"));
    let config_volume = volumes[mounts["/etc/delegate"]];
    let cm_name = config_volume["configMap"]["name"].as_str().unwrap();

    // Every Secret/ConfigMap reference resolves to a document and key in this file.
    let data_of = |kind: &str, name: &str| -> BTreeMap<String, String> {
        let doc = find(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} {name}"));
        let mut out = BTreeMap::new();
        for section in ["data", "stringData"] {
            if let Some(m) = doc[section].as_mapping() {
                for (k, v) in m {
                    out.insert(
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap_or_default().to_string(),
                    );
                }
            }
        }
        out
    };
    let mut secret_refs = 0;
    for c in containers.iter().chain(inits) {
        for e in c["env"].as_sequence().into_iter().flatten() {
            for (kind, r) in [
                ("Secret", &e["valueFrom"]["secretKeyRef"]),
                ("ConfigMap", &e["valueFrom"]["configMapKeyRef"]),
            ] {
                if r.is_null() {
                    continue;
                }
                let (name, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                assert!(
                    data_of(kind, name).contains_key(key),
                    "{kind} {name} has no {key}"
                );
                secret_refs += usize::from(kind == "Secret");
            }
        }
    }
    assert!(secret_refs >= 1, "the enrollment token comes from a Secret");
    let enroll = inits
        .iter()
        .find(|c| strs(&c["args"]).first().map(String::as_str) == Some("enroll"))
        .expect("an init container running `delegate enroll`");
    let token_env = enroll["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| !e["valueFrom"]["secretKeyRef"].is_null())
        .expect("enroll takes the token from the Secret");
    let args = strs(&enroll["args"]);
    let arg_after = |flag: &str| -> String {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("enroll {flag}"));
        args[i + 1].clone()
    };
    assert_eq!(
        arg_after("--token"),
        format!("$({})", token_env["name"].as_str().unwrap())
    );
    // --url is the HTTPS API (where the CSR goes), not the agent's wss:// endpoint.
    let url_var = arg_after("--url");
    let url_env = enroll["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| format!("$({})", e["name"].as_str().unwrap()) == url_var)
        .expect("--url comes from an env variable");
    let url_ref = &url_env["valueFrom"]["configMapKeyRef"];
    let enroll_url = data_of("ConfigMap", url_ref["name"].as_str().unwrap())
        [url_ref["key"].as_str().unwrap()]
    .clone();
    assert!(enroll_url.starts_with("https://"), "{enroll_url}");
    // The built agent accepts the init container's arguments (with the variables filled in): an
    // unreachable control plane is exit 1, a usage error would be 2.
    let filled: Vec<String> = args
        .iter()
        .map(|a| {
            if a == &url_var {
                "https://127.0.0.1:1".to_string()
            } else if a.starts_with("$(") && a.contains("SHA256") {
                "0".repeat(64)
            } else if a.starts_with("$(") {
                "pod-1".to_string()
            } else if a == "/var/lib/delegate/tls" {
                scratch.path().join("tls").display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = run(clean_cmd(bin("delegate")).args(&filled));
    assert_eq!(
        out.status.code(),
        Some(1),
        "enroll {filled:?}: {}",
        both(&out)
    );
    // Init containers run again when the kubelet recreates the pod's sandbox; the emptyDir still
    // holds the identity then, and the same arguments must accept it (exit 0, nothing sent) rather
    // than crash-loop the pod.
    assert!(
        args.iter().any(|a| a == "--if-absent"),
        "enroll --if-absent"
    );
    let tls = scratch.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for f in ["agent.key", "agent.pem", "agent.toml"] {
        std::fs::write(tls.join(f), "x").unwrap();
    }
    let out = run(clean_cmd(bin("delegate")).args(&filled));
    assert_eq!(
        out.status.code(),
        Some(0),
        "enroll {filled:?} on an enrolled directory: {}",
        both(&out)
    );
    assert!(both(&out).contains("already enrolled"), "{}", both(&out));

    // The agent config: certificates where enroll writes them, state on the mounted volume, and a
    // drain that fits the termination grace period.
    let cm = data_of("ConfigMap", cm_name);
    let cfg: toml::Table = cm["agent.toml"]
        .parse()
        .expect("agent.toml in the ConfigMap");
    let data_dir = cfg["data_dir"].as_str().unwrap();
    // On a mounted volume, but not its root: the agent creates data_dir 0700, while an emptyDir's
    // root is 0777, which `doctor` (the probes) fails.
    assert!(
        mounts
            .keys()
            .any(|m| Path::new(data_dir).parent() == Some(Path::new(m))),
        "data_dir {data_dir} is a directory in a mounted volume"
    );
    assert!(pod["securityContext"]["fsGroup"].is_null(), "fsGroup");
    // The same decision as the compose sidecar: the per-task host firewall is off (no tool, no
    // capability in the pod), the node's rules and the README take over.
    assert_eq!(cfg["egress"]["firewall"].as_str(), Some("off"));
    let readme = read("packaging/k8s/README.md");
    assert!(
        readme.contains("node-firewall.nft") && readme.contains("NetworkPolicy"),
        "packaging/k8s/README.md explains the firewall decision"
    );
    let out_dir = arg_after("--out");
    for key in ["ca_file", "cert_file", "key_file"] {
        let p = Path::new(cfg["control_plane"][key].as_str().unwrap());
        assert_eq!(p.parent(), Some(Path::new(&out_dir)), "control_plane.{key}");
    }
    let drain = seconds(cfg["agent"]["drain_timeout"].as_str().unwrap());
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} <= drain {drain}s"
    );
}
