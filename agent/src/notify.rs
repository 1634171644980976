//! The systemd notification protocol (`sd_notify`): `READY=1`, `STATUS=...`, `WATCHDOG=1`,
//! `STOPPING=1`, `RELOADING=1`, each one datagram to the unix socket named by `NOTIFY_SOCKET`.
//!
//! Owns reading `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (once, at start) and writing
//! the datagrams. Decisions (the watchdog interval, the text of a status line) are plain
//! functions.
//!
//! Must never: fail the agent because the socket is gone or full (a notification is best effort:
//! an error is returned for the caller to log once, never retried in a loop), block (the socket is
//! non-blocking), or put a secret in a status line.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Why a notification could not be sent. Never fatal and never retried: the next notification
/// tries again on its own.
#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is not a usable socket address")]
    BadAddress(String),
    #[error("cannot write to NOTIFY_SOCKET {socket}: {source}")]
    Send {
        socket: String,
        #[source]
        source: io::Error,
    },
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (`NOTIFY_SOCKET=@name`), without the `@`.
    Abstract(Vec<u8>),
}

impl NotifyTarget {
    /// Parse a `NOTIFY_SOCKET` value: an absolute path, or `@name` for an abstract socket.
    pub fn parse(value: &str) -> Result<NotifyTarget, NotifyError> {
        if let Some(name) = value.strip_prefix('@') {
            if name.is_empty() {
                return Err(NotifyError::BadAddress(value.to_string()));
            }
            return Ok(NotifyTarget::Abstract(name.as_bytes().to_vec()));
        }
        if value.starts_with('/') {
            return Ok(NotifyTarget::Path(PathBuf::from(value)));
        }
        Err(NotifyError::BadAddress(value.to_string()))
    }

    fn shown(&self) -> String {
        match self {
            NotifyTarget::Path(p) => p.display().to_string(),
            NotifyTarget::Abstract(n) => format!("@{}", String::from_utf8_lossy(n)),
        }
    }
}

/// The watchdog ping interval: half of `WATCHDOG_USEC`, when the watchdog is meant for this
/// process (`WATCHDOG_PID` unset or equal to `pid`). `None`: no watchdog.
pub fn watchdog_interval(
    usec: Option<&str>,
    watchdog_pid: Option<&str>,
    pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(p) = watchdog_pid {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// One `STATUS=` text on a single line (a newline would start another assignment).
pub fn status_line(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={one_line}")
}

/// Sends notifications to the service manager. Without `NOTIFY_SOCKET` every call is a no-op.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<NotifyTarget>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From this process's environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`). A bad
    /// `NOTIFY_SOCKET` gives an error the caller logs; the notifier is then disabled.
    pub fn from_env() -> (Notifier, Option<NotifyError>) {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let wpid = std::env::var("WATCHDOG_PID").ok();
        let watchdog = watchdog_interval(usec.as_deref(), wpid.as_deref(), std::process::id());
        match std::env::var("NOTIFY_SOCKET") {
            Err(_) => (Notifier::default(), None),
            Ok(v) => match NotifyTarget::parse(&v) {
                Ok(t) => (Notifier::new(Some(t), watchdog), None),
                Err(e) => (Notifier::default(), Some(e)),
            },
        }
    }

    /// An explicit target and watchdog interval (tests, embedding).
    pub fn new(target: Option<NotifyTarget>, watchdog: Option<Duration>) -> Notifier {
        Notifier { target, watchdog }
    }

    /// No service manager is listening.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if a watchdog is set.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.target.is_some())
    }

    /// Send one notification: newline-separated `KEY=VALUE` assignments.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let err = |source: io::Error| NotifyError::Send {
            socket: target.shown(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        sock.set_nonblocking(true).map_err(err)?;
        match target {
            NotifyTarget::Path(p) => sock.send_to(state.as_bytes(), p).map_err(err)?,
            NotifyTarget::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(err)?;
                sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?
            }
        };
        Ok(())
    }

    /// The agent's start-up checks passed.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("READY=1\n{}", status_line(status)))
    }

    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&status_line(status))
    }

    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// Draining started.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("STOPPING=1\n{}", status_line(status)))
    }

    /// A reload started (`READY=1` follows when it is done).
    pub fn reloading(&self) -> Result<(), NotifyError> {
        let mono = monotonic_usec();
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={mono}"))
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd wants with `RELOADING=1`.
fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_half_the_period_and_only_for_this_pid() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(
            watchdog_interval(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn targets() {
        assert_eq!(
            NotifyTarget::parse("/run/systemd/notify").unwrap(),
            NotifyTarget::Path("/run/systemd/notify".into())
        );
        assert_eq!(
            NotifyTarget::parse("@sd").unwrap(),
            NotifyTarget::Abstract(b"sd".to_vec())
        );
        assert!(NotifyTarget::parse("@").is_err());
        assert!(NotifyTarget::parse("relative").is_err());
        assert!(NotifyTarget::parse("").is_err());
    }

    #[test]
    fn status_stays_on_one_line() {
        assert_eq!(status_line("a\nb\rc"), "STATUS=a b c");
    }

    #[test]
    fn disabled_notifier_is_silent() {
        let n = Notifier::disabled();
        assert!(n.ready("x").is_ok());
        assert_eq!(n.watchdog_interval(), None);
        let n = Notifier::new(None, Some(Duration::from_secs(1)));
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn datagrams_reach_a_socket_file_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(NotifyTarget::Path(path)), None);
        n.ready("connected").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=connected");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("delegate-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(
            Some(NotifyTarget::parse(&format!("@{name}")).unwrap()),
            None,
        );
        n.watchdog().unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let n = Notifier::new(Some(NotifyTarget::Path("/nonexistent/notify".into())), None);
        let e = n.watchdog().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/notify"), "{e}");
    }
}
