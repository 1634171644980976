//! An upstream of the project's own for the egress tests: a Docker container with no Docker network,
//! reached from the host over a veth pair at an address of 198.18.0.0/15 (the benchmarking range,
//! never routed), in whose network namespace a test binds its servers.
//!
//! What it owns: one container (named `delegate-<role>-<run>`, labelled `RUN_LABEL=<run>`, running
//! the image's `/bin/busybox sleep`) and one veth pair (`dlgu<tag>` on the host, `dlgc<tag>` moved
//! into the container's namespace). [`Upstream::stop`], also run on drop, removes the container,
//! which takes its namespace and so the veth pair with it, and then deletes the host-side veth in
//! case the container would not die. The run label also lets `docker::Cleanup` (and so `Fleet`)
//! remove the container, pass or fail.
//!
//! What it must never do: touch any container, network, namespace or link it did not create here;
//! give the container a Docker network or any route beyond its own /30; publish ports; or reach
//! anything outside this host. Names reach the upstream only through the agent's `egress.hosts`,
//! so nothing is asked of DNS.
//!
//! Needs root (veth, namespaces, `nsenter`), Docker, and an image holding a static `/bin/busybox`
//! ([`busybox`] reads the host's, Debian `busybox-static`).

use crate::RUN_LABEL;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;

/// The host's static busybox, copied into the images of the upstream container.
pub const BUSYBOX: &str = "/bin/busybox";

/// The bytes of [`BUSYBOX`]; panics saying where it comes from when it is missing.
pub fn busybox() -> Vec<u8> {
    std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("{BUSYBOX} is needed (Debian busybox-static, see .ci/install-deps): {e}")
    })
}

/// Run `cmd args`, insisting it succeeds (its stderr in the panic otherwise).
pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A random number, for addresses and interface names.
pub fn random_u32() -> u32 {
    u32::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..4].try_into().unwrap())
}

/// The container without a Docker network, with its end of a veth pair at `ip` (see the module
/// documentation for what it owns and removes).
pub struct Upstream {
    container: String,
    veth: String,
    pid: String,
    /// The container's address.
    pub ip: Ipv4Addr,
}

impl Upstream {
    /// Pick the addresses first (the agent's configuration names them), start later: a /30 in
    /// 198.18.0.0/15, `.1` on the host side, `.2` in the container.
    pub fn address() -> (Ipv4Addr, Ipv4Addr) {
        let n = random_u32();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + ((n % 32768) << 2);
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    /// Start the container `delegate-<role>-<run>` from `image` (which must hold `/bin/busybox`),
    /// labelled with `run`, and connect it: `host_ip`/30 on the host's end of the veth pair, `ip`/30
    /// on the container's, both up, and the container's loopback up.
    pub fn start(run: &str, role: &str, image: &str, host_ip: Ipv4Addr, ip: Ipv4Addr) -> Upstream {
        let name = format!("delegate-{role}-{run}");
        let label = format!("{RUN_LABEL}={run}");
        sh(
            "docker",
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                &label,
                "--network",
                "none",
                "--entrypoint",
                BUSYBOX,
                image,
                "sleep",
                "3600",
            ],
        );
        let pid = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", &name])
            .output()
            .unwrap();
        let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
        let tag = format!("{:06x}", random_u32() & 0xff_ffff);
        let (veth, peer) = (format!("dlgu{tag}"), format!("dlgc{tag}"));
        // From here on, a panic removes the container (and the veth) on drop.
        let up = Upstream {
            container: name,
            veth: veth.clone(),
            pid: pid.clone(),
            ip,
        };
        assert!(pid.parse::<u32>().is_ok_and(|p| p > 0), "pid {pid:?}");
        sh(
            "ip",
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        );
        sh("ip", &["link", "set", &peer, "netns", &pid]);
        sh(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &veth],
        );
        sh("ip", &["link", "set", &veth, "up"]);
        let netns = up.netns_arg();
        let inside = |args: &[&str]| {
            let mut all = vec![netns.as_str(), "ip"];
            all.extend_from_slice(args);
            sh("nsenter", &all);
        };
        inside(&["addr", "add", &format!("{ip}/30"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        up
    }

    /// `nsenter`'s argument for the container's network namespace.
    fn netns_arg(&self) -> String {
        format!("--net=/proc/{}/ns/net", self.pid)
    }

    /// `nsenter --net=<the container's namespace>`: append the command to run there.
    pub fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(self.netns_arg());
        c
    }

    /// A listener on `0.0.0.0:port` inside the container's network namespace. It is bound from a
    /// thread that enters the namespace; the socket stays there when the thread ends. Call it in
    /// the tokio runtime.
    pub fn listen(&self, port: u16) -> tokio::net::TcpListener {
        let ns_path = format!("/proc/{}/ns/net", self.pid);
        let listener = std::thread::spawn(move || {
            let ns = std::fs::File::open(ns_path).unwrap();
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .unwrap();
        tokio::net::TcpListener::from_std(listener).unwrap()
    }

    /// Remove the container (and with its namespace, the veth pair). Idempotent; also run on drop.
    pub fn stop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        // Gone with the namespace already; this only covers a container that would not die.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}
