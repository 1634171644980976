//! Certificates: the agent CA (which also signs the server certificate), the server certificate and
//! agent client certificates, and reading an agent's identity out of a verified certificate.
//!
//! Owns: key generation (ECDSA P-256 through rcgen/ring) and certificate contents (names, EKUs,
//! validity). Never writes files (see `init`) and never decides whether a peer is trusted (rustls
//! does that against the CA in `tls`).

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// Errors building or reading certificates. Not retryable: the inputs are wrong.
#[derive(Debug, Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate issued for a key the requester keeps (see [`Ca::issue_agent_from_csr`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedForKey {
    pub cert_pem: String,
    /// Lower-case hex of the serial number, as [`serial_hex`] reads it back.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Validity window as whole UTC days relative to today (negative = in the past).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub from_days: i64,
    pub until_days: i64,
}

impl Validity {
    /// From yesterday (clock skew) for `days` days.
    pub fn days(days: i64) -> Self {
        Validity {
            from_days: -1,
            until_days: days,
        }
    }
}

/// The agent CA, loaded or freshly generated, able to issue certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl Ca {
    /// A new self-signed CA, valid ten years.
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, Validity::days(3650));
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            cert,
            key,
            cert_pem,
        })
    }

    /// Load a CA from its PEM certificate and key (as written by `init`).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Invalid {
            what: "CA key",
            reason: e.to_string(),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| PkiError::Invalid {
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        // Re-signing the parsed parameters gives an issuer with the same name and key, which is
        // all that signing needs; the original PEM stays the one we hand out.
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert,
            key,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The server certificate: SANs localhost, 127.0.0.1 and `extra_sans` (DNS names or IPs).
    pub fn issue_server(&self, extra_sans: &[String]) -> Result<Issued, PkiError> {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        for s in extra_sans {
            if !sans.contains(s) {
                sans.push(s.clone());
            }
        }
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = dn("delegate-cp");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, Validity::days(730));
        self.sign(params)
    }

    /// An agent client certificate: CN = `name`, client-auth EKU.
    pub fn issue_agent(&self, name: &str, validity: Validity) -> Result<Issued, PkiError> {
        check_agent_name(name)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        self.sign(params)
    }

    /// An agent client certificate for the key of a certificate signing request (PKCS#10 PEM;
    /// its signature is checked, so the requester holds the key): CN = `name`, client-auth EKU,
    /// a random serial, valid from `not_before` to `not_after` (Unix seconds). Nothing of the
    /// request but its public key is used: not its subject, extensions or requested usages.
    pub fn issue_agent_from_csr(
        &self,
        name: &str,
        csr_pem: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<IssuedForKey, PkiError> {
        check_agent_name(name)?;
        let invalid_csr = |reason: String| PkiError::Invalid {
            what: "certificate signing request",
            reason,
        };
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| invalid_csr(e.to_string()))?;
        let time = |secs: i64| {
            x509_parser::time::ASN1Time::from_timestamp(secs)
                .map(|t| t.to_datetime())
                .map_err(|e| PkiError::Invalid {
                    what: "validity",
                    reason: format!("{secs}: {e}"),
                })
        };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = time(not_before)?;
        params.not_after = time(not_after)?;
        // rcgen's default serial is a hash of the public key: a renewal with the same key would
        // repeat it. Random, positive, never a leading zero byte.
        let mut serial = [0u8; 16];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut serial[..]);
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.cert, &self.key)?;
        Ok(IssuedForKey {
            cert_pem: cert.pem(),
            serial: hex::encode(serial),
            not_before,
            not_after,
        })
    }

    fn sign(&self, params: CertificateParams) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Agent names become certificate CNs, directory names and audit subjects: keep them plain.
pub fn check_agent_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(PkiError::Invalid {
            what: "agent name",
            reason: format!(
                "{name:?}: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.', not starting with '.'"
            ),
        })
    }
}

/// The common name of a DER certificate: the agent's identity once rustls has verified it.
pub fn common_name(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Invalid {
        what: "peer certificate",
        reason: e.to_string(),
    })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or(PkiError::Invalid {
            what: "peer certificate",
            reason: "no common name".into(),
        })?;
    let cn = cn.as_str().map_err(|e| PkiError::Invalid {
        what: "peer certificate common name",
        reason: e.to_string(),
    })?;
    if cn.is_empty() || cn.len() > delegate_protocol::limits::MAX_NAME {
        return Err(PkiError::Invalid {
            what: "peer certificate common name",
            reason: "must be 1..=256 bytes".into(),
        });
    }
    Ok(cn.to_string())
}

/// The common name a certificate signing request (PEM) asks for, if it names one: a default for
/// the agent's name, never trusted for anything else.
pub fn csr_common_name(csr_pem: &str) -> Result<Option<String>, PkiError> {
    use x509_parser::prelude::FromDer;
    let invalid = |reason: String| PkiError::Invalid {
        what: "certificate signing request",
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(invalid(format!(
            "PEM block is {:?}, not \"CERTIFICATE REQUEST\"",
            pem.label
        )));
    }
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| invalid(e.to_string()))?;
    let cn = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Ok(cn)
}

/// Lower-case hex of a DER certificate's serial number (its DER integer bytes).
pub fn serial_hex(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Invalid {
        what: "certificate",
        reason: e.to_string(),
    })?;
    Ok(hex::encode(cert.raw_serial()))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Delegate");
    dn
}

fn set_validity(params: &mut CertificateParams, v: Validity) {
    let today = days_since_epoch(SystemTime::now());
    let (y, m, d) = civil_from_days(today + v.from_days);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(today + v.until_days);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

fn days_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() / 86_400) as i64,
        Err(_) => 0,
    }
}

/// Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (y as i32, m as u8, d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn agent_cert_carries_name_and_client_eku() {
        let ca = Ca::generate("test CA").unwrap();
        let issued = ca.issue_agent("runner-1", Validity::days(365)).unwrap();
        let der = pem_to_der(&issued.cert_pem);
        assert_eq!(common_name(&der).unwrap(), "runner-1");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 366);
    }

    #[test]
    fn reloaded_ca_issues_verifiable_certs() {
        let ca = Ca::generate("test CA").unwrap();
        let again = Ca::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        let issued = again.issue_server(&["cp.example".into()]).unwrap();
        let der = pem_to_der(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = pem_to_der(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let sans = format!(
            "{:?}",
            cert.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            sans.contains("localhost") && sans.contains("cp.example"),
            "{sans}"
        );
    }

    #[test]
    fn csr_gives_only_its_key() {
        let ca = Ca::generate("test CA").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        req.distinguished_name = dn("someone-else");
        req.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr_pem = req.serialize_request(&key).unwrap().pem().unwrap();
        let now = 1_700_000_000;
        let a = ca
            .issue_agent_from_csr("runner-1", &csr_pem, now - 300, now + 3600)
            .unwrap();
        let b = ca
            .issue_agent_from_csr("runner-1", &csr_pem, now, now + 7200)
            .unwrap();
        assert_ne!(a.serial, b.serial, "same key, fresh serial");
        let der = pem_to_der(&a.cert_pem);
        assert_eq!(common_name(&der).unwrap(), "runner-1");
        assert_eq!(serial_hex(&der).unwrap(), a.serial);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.validity().not_before.timestamp(), now - 300);
        assert_eq!(cert.validity().not_after.timestamp(), now + 3600);
        assert!(!cert.is_ca());
        assert!(cert.subject_alternative_name().unwrap().is_none());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(cert.public_key().raw, key.public_key_der().as_slice());
        let ca_der = pem_to_der(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();

        assert_eq!(
            csr_common_name(&csr_pem).unwrap().as_deref(),
            Some("someone-else")
        );
        let mut anonymous = CertificateParams::new(Vec::<String>::new()).unwrap();
        anonymous.distinguished_name = DistinguishedName::new();
        let anonymous = anonymous.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(csr_common_name(&anonymous).unwrap(), None);
        assert!(
            csr_common_name(ca.cert_pem()).is_err(),
            "a certificate is not a CSR"
        );
        assert!(csr_common_name("junk").is_err());
        for bad in [
            "",
            "not a csr",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            assert!(ca
                .issue_agent_from_csr("runner-1", bad, now, now + 60)
                .is_err());
        }
        assert!(ca
            .issue_agent_from_csr("../x", &csr_pem, now, now + 60)
            .is_err());
    }

    #[test]
    fn bad_agent_names_refused() {
        for bad in ["", "a/b", "..", ".hidden", "a b", &"x".repeat(65)] {
            assert!(check_agent_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_agent_name("vm-runner_1.prod").is_ok());
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}
