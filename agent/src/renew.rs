//! Client certificate renewal over the live link.
//!
//! Schedule ([`renewal_due`], [`next_attempt`]): renew at about two thirds of the certificate's
//! life (minus a small per-agent jitter so a pool enrolled together does not renew together); after
//! a failed or unanswered attempt, retry after a tenth of the time left, between 30 s and 1 h.
//!
//! Key: the renewal CSR is made from the **same** private key (`control_plane.key_file`). The key
//! file is never rewritten, so installing a renewal is one atomic rename of the certificate file:
//! there is no moment where the key and the certificate on disk do not match, even after a crash.
//! (Rotating the key means enrolling again.)
//!
//! Installing ([`Renewer::install`]): the new certificate must parse, hold our public key, be
//! valid now and make a working TLS configuration with our key and the CA (the new CA bundle when
//! the answer carries one); only then is the CA bundle (if any) and the certificate written
//! atomically (temporary file, fsync, rename), and the TLS configuration for the *next*
//! connection replaced. The current connection and every task are untouched.
//!
//! Must never: write a certificate it did not check, write the key, or log key material.

use crate::tls::{self, TlsError, TlsHandle};
use delegate_protocol::RenewResponse;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use thiserror::Error;

/// Why a renewal step failed. All are retried on the schedule of [`next_attempt`]; none stops
/// the agent (the current certificate stays in use).
#[derive(Debug, Error)]
pub enum RenewError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("private key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("renewed certificate refused: {0}")]
    Refused(String),
    #[error("cannot write {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: at two thirds of
/// its life, earlier by up to 5 % of the life according to `jitter` (in `[0, 1)`).
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let at = life.mul_f64(2.0 / 3.0 - 0.05 * jitter);
    not_before + at
}

/// How long to wait before the next renewal attempt. Before the due time: until then. At or after
/// it: at once for the first attempt, then (after `failures` failed or unanswered attempts) a tenth
/// of the time left until expiry, at least 30 s and at most 1 h.
pub fn next_attempt(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    jitter: f64,
    failures: u32,
) -> Duration {
    let due = renewal_due(not_before, not_after, jitter);
    if let Ok(wait) = due.duration_since(now) {
        if !wait.is_zero() {
            return wait;
        }
    }
    if failures == 0 {
        return Duration::ZERO;
    }
    let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
    (left / 10).clamp(RETRY_MIN, RETRY_MAX)
}

const RETRY_MIN: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// The files a renewal reads and writes, and the TLS handle it updates.
#[derive(Debug, Clone)]
pub struct Renewer {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub spki_pin: Option<[u8; 32]>,
    pub tls: TlsHandle,
    /// In `[0, 1)`; fixed per agent so its schedule is stable across restarts.
    pub jitter: f64,
}

/// What was installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub validity: tls::CertValidity,
    pub ca_replaced: bool,
}

impl Renewer {
    /// Jitter derived from the agent's name: stable for one agent, spread across a pool.
    pub fn jitter_for(name: &str) -> f64 {
        let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        let b = d.as_ref();
        u16::from_be_bytes([b[0], b[1]]) as f64 / 65536.0
    }

    /// The validity of the certificate currently on disk.
    pub fn current_validity(&self) -> Result<tls::CertValidity, RenewError> {
        let chain = tls::load_cert_chain(&self.cert_file)?;
        let leaf = chain.first().ok_or_else(|| TlsError::Cert {
            path: self.cert_file.clone(),
            reason: "no PEM certificate found".into(),
        })?;
        tls::cert_validity(leaf).map_err(|reason| {
            RenewError::Tls(TlsError::Cert {
                path: self.cert_file.clone(),
                reason,
            })
        })
    }

    /// How long until the next attempt, for the certificate on disk.
    pub fn wait(&self, now: SystemTime, failures: u32) -> Result<Duration, RenewError> {
        let v = self.current_validity()?;
        Ok(next_attempt(
            now,
            v.not_before,
            v.not_after,
            self.jitter,
            failures,
        ))
    }

    fn key_pair(&self) -> Result<rcgen::KeyPair, RenewError> {
        let err = |reason: &str| RenewError::Key {
            path: self.key_file.clone(),
            reason: reason.to_string(),
        };
        let pem = std::fs::read_to_string(&self.key_file).map_err(|e| err(&e.to_string()))?;
        rcgen::KeyPair::from_pem(&pem).map_err(|_| err("not a usable private key for a CSR"))
    }

    /// A PEM CSR for the current key, naming `name` (the control plane issues for the identity
    /// of the connection whatever the CSR names).
    pub fn csr_pem(&self, name: &str) -> Result<String, RenewError> {
        tls::csr_pem(&self.key_pair()?, name).map_err(RenewError::Refused)
    }

    /// Check the answer, write it atomically, use it for the next connection.
    pub fn install(&self, resp: &RenewResponse, now: SystemTime) -> Result<Installed, RenewError> {
        let chain = tls::parse_cert_pem(resp.cert_pem.as_bytes(), &self.cert_file)?;
        let leaf = &chain[0];
        let validity = tls::cert_validity(leaf).map_err(RenewError::Refused)?;
        if now < validity.not_before || now >= validity.not_after {
            return Err(RenewError::Refused(
                "the new certificate is not valid now".into(),
            ));
        }
        let ours = self.key_pair()?;
        let theirs = tls::spki_sha256(leaf).map_err(RenewError::Refused)?;
        let mine = ring::digest::digest(&ring::digest::SHA256, &ours.public_key_der());
        if theirs[..] != *mine.as_ref() {
            return Err(RenewError::Refused(
                "the new certificate is not for this agent's key".into(),
            ));
        }
        let roots = match &resp.ca_pem {
            Some(ca) => tls::parse_ca_pem(ca.as_bytes(), &self.ca_file)?,
            None => tls::load_ca(&self.ca_file)?,
        };
        let key = tls::load_private_key(&self.key_file)?;
        let config = tls::client_config_from_parts(
            roots,
            chain.clone(),
            key,
            self.spki_pin,
            &self.cert_file,
            &self.key_file,
        )?;
        if let Some(ca) = &resp.ca_pem {
            write_atomic(&self.ca_file, ca.as_bytes(), 0o644)?;
        }
        write_atomic(&self.cert_file, resp.cert_pem.as_bytes(), 0o644)?;
        self.tls.replace(config);
        Ok(Installed {
            validity,
            ca_replaced: resp.ca_pem.is_some(),
        })
    }
}

/// Write `data` to `path` atomically: a temporary file beside it (mode `mode`), fsync, rename,
/// fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), RenewError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| RenewError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn due_at_two_thirds_of_life_minus_jitter() {
        assert_eq!(renewal_due(t(0), t(3000), 0.0), t(2000));
        assert_eq!(renewal_due(t(1000), t(4000), 0.0), t(3000));
        // The most jitter moves it 5 % of the life earlier.
        let earliest = renewal_due(t(0), t(3000), 0.999_999_9);
        assert!(earliest >= t(1850) && earliest < t(1851), "{earliest:?}");
        assert!(renewal_due(t(0), t(3000), 0.5) < t(2000));
        assert!(renewal_due(t(0), t(3000), 0.5) > t(1850));
        // Nonsense inputs stay in range.
        assert_eq!(renewal_due(t(0), t(3000), f64::NAN), t(2000));
        assert_eq!(renewal_due(t(0), t(3000), -4.0), t(2000));
        assert_eq!(renewal_due(t(100), t(50), 0.0), t(100));
    }

    #[test]
    fn waits_until_due_then_renews_at_once_then_backs_off() {
        let (nb, na) = (t(0), t(30 * 86400));
        assert_eq!(
            next_attempt(t(0), nb, na, 0.0, 0),
            Duration::from_secs(20 * 86400)
        );
        assert_eq!(
            next_attempt(t(19 * 86400), nb, na, 0.0, 0),
            Duration::from_secs(86400)
        );
        assert_eq!(next_attempt(t(20 * 86400), nb, na, 0.0, 0), Duration::ZERO);
        assert_eq!(next_attempt(t(25 * 86400), nb, na, 0.0, 0), Duration::ZERO);
        // After a failure: a tenth of what is left, capped at an hour...
        assert_eq!(
            next_attempt(t(20 * 86400), nb, na, 0.0, 1),
            Duration::from_secs(3600)
        );
        // ...and at least 30 s, even past expiry.
        let short = (t(0), t(600));
        assert_eq!(
            next_attempt(t(500), short.0, short.1, 0.0, 3),
            Duration::from_secs(30)
        );
        assert_eq!(
            next_attempt(t(10_000), short.0, short.1, 0.0, 3),
            Duration::from_secs(30)
        );
        let mid = (t(0), t(30_000));
        assert_eq!(
            next_attempt(t(25_000), mid.0, mid.1, 0.0, 1),
            Duration::from_secs(500)
        );
    }

    #[test]
    fn jitter_is_stable_per_name_and_in_range() {
        let a = Renewer::jitter_for("runner-1");
        assert_eq!(a, Renewer::jitter_for("runner-1"));
        assert_ne!(a, Renewer::jitter_for("runner-2"));
        for n in ["a", "b", "runner-77", ""] {
            let j = Renewer::jitter_for(n);
            assert!((0.0..1.0).contains(&j));
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        ca: rcgen::Certificate,
        ca_key: KeyPair,
        key: KeyPair,
        renewer: Renewer,
    }

    fn ca(cn: &str) -> (rcgen::Certificate, KeyPair) {
        let k = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        (p.self_signed(&k).unwrap(), k)
    }

    fn issue(ca: &rcgen::Certificate, ca_key: &KeyPair, key: &KeyPair, days: u32) -> String {
        let mut p = CertificateParams::new(vec!["runner-1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "runner-1");
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        p.not_before = (now - day).into();
        p.not_after = (now + day * days).into();
        p.signed_by(key, ca, ca_key).unwrap().pem()
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = ca("renew CA");
        let key = KeyPair::generate().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let cert_file = dir.path().join("agent.pem");
        let key_file = dir.path().join("agent.key");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, issue(&ca, &ca_key, &key, 3)).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let config = tls::client_config(&ca_file, &cert_file, &key_file, None).unwrap();
        let renewer = Renewer {
            ca_file,
            cert_file,
            key_file,
            spki_pin: None,
            tls: TlsHandle::new(config),
            jitter: 0.0,
        };
        Fixture {
            dir,
            ca,
            ca_key,
            key,
            renewer,
        }
    }

    #[test]
    fn csr_carries_our_key() {
        let f = fixture();
        let pem = f.renewer.csr_pem("runner-1").unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE REQUEST"));
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(csr.public_key.der_bytes(), f.key.der_bytes());
        assert!(!pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn install_checks_then_writes_and_swaps() {
        let f = fixture();
        let before = f.renewer.tls.current();
        let old = std::fs::read_to_string(&f.renewer.cert_file).unwrap();
        let key_before = std::fs::read(&f.renewer.key_file).unwrap();
        let new = issue(&f.ca, &f.ca_key, &f.key, 30);
        let done = f
            .renewer
            .install(
                &RenewResponse {
                    cert_pem: new.clone(),
                    ca_pem: None,
                },
                SystemTime::now(),
            )
            .unwrap();
        assert!(!done.ca_replaced);
        assert_eq!(std::fs::read_to_string(&f.renewer.cert_file).unwrap(), new);
        assert_ne!(old, new);
        assert_eq!(std::fs::read(&f.renewer.key_file).unwrap(), key_before);
        assert!(!std::sync::Arc::ptr_eq(&before, &f.renewer.tls.current()));
        // Nothing left behind but the three files.
        let mut names: Vec<String> = std::fs::read_dir(f.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["agent.key", "agent.pem", "ca.pem"]);
    }

    #[test]
    fn install_refuses_bad_answers_and_keeps_the_old_files() {
        let f = fixture();
        let old = std::fs::read_to_string(&f.renewer.cert_file).unwrap();
        let before = f.renewer.tls.current();
        let other_key = KeyPair::generate().unwrap();
        let (other_ca, other_ca_key) = ca("other CA");
        let expired = {
            let mut p = CertificateParams::new(vec!["runner-1".to_string()]).unwrap();
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
            p.signed_by(&f.key, &f.ca, &f.ca_key).unwrap().pem()
        };
        let cases = [
            ("garbage".to_string(), None, "no PEM"),
            (
                issue(&f.ca, &f.ca_key, &other_key, 30),
                None,
                "not for this agent's key",
            ),
            (expired, None, "not valid now"),
            (
                issue(&f.ca, &f.ca_key, &f.key, 30),
                Some("not a CA".to_string()),
                "no PEM",
            ),
        ];
        for (cert_pem, ca_pem, needle) in cases {
            let e = f
                .renewer
                .install(&RenewResponse { cert_pem, ca_pem }, SystemTime::now())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
            assert_eq!(std::fs::read_to_string(&f.renewer.cert_file).unwrap(), old);
            assert!(std::sync::Arc::ptr_eq(&before, &f.renewer.tls.current()));
        }
        // A certificate from another CA, with that CA: accepted and both files replaced.
        let new = issue(&other_ca, &other_ca_key, &f.key, 30);
        let done = f
            .renewer
            .install(
                &RenewResponse {
                    cert_pem: new,
                    ca_pem: Some(other_ca.pem()),
                },
                SystemTime::now(),
            )
            .unwrap();
        assert!(done.ca_replaced);
        assert_eq!(
            std::fs::read_to_string(&f.renewer.ca_file).unwrap(),
            other_ca.pem()
        );
    }

    #[test]
    fn wait_reads_the_certificate_on_disk() {
        let f = fixture();
        // Issued from yesterday for 3 days: 4 days of life, due after 2⅔ days, i.e. in ~1⅔ days.
        let w = f.renewer.wait(SystemTime::now(), 0).unwrap();
        assert!(
            w > Duration::from_secs(86400) && w < Duration::from_secs(2 * 86400),
            "{w:?}"
        );
    }
}
