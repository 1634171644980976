//! The agent's TLS client configuration: rustls with the ring provider, TLS 1.3 only, trusting only
//! the configured CA bundle, presenting the agent's certificate, and optionally pinning the server
//! certificate's SubjectPublicKeyInfo (SHA-256).
//!
//! This module owns reading the PEM files and building the [`ClientConfig`]; it never opens a
//! socket. Errors name the file they concern and never include key material.

use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Why a TLS configuration could not be built. Not retryable: the files must be fixed (a later
/// reload may pick up corrected files).
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("CA bundle {}: {reason}", path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("certificate {}: {reason}", path.display())]
    Cert { path: PathBuf, reason: String },
    #[error("private key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("private key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The one crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| e.to_string())
}

/// Read every certificate of a PEM bundle into a root store. Fails if the file holds none.
pub fn load_ca(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = read(path).map_err(|reason| TlsError::Ca {
        path: path.to_path_buf(),
        reason,
    })?;
    parse_ca_pem(&pem, path)
}

/// Read a PEM certificate chain (leaf first).
pub fn load_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path).map_err(|reason| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    })?;
    parse_cert_pem(&pem, path)
}

/// Read a PEM private key (PKCS#8, PKCS#1 or SEC1). The error never quotes the file's content.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |reason: &str| TlsError::Key {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let pem = read(path).map_err(|e| err(&e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => err("no PEM private key found"),
        _ => err("not a valid PEM private key"),
    })
}

/// Fail if the certificate is outside its validity period now.
pub fn check_validity(cert: &CertificateDer<'_>, path: &Path) -> Result<(), TlsError> {
    let err = |reason: String| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| err(format!("not a valid X.509 certificate: {e}")))?;
    let v = parsed.validity();
    if !v.is_valid() {
        return Err(err(format!(
            "not valid now (valid from {} until {})",
            v.not_before, v.not_after
        )));
    }
    Ok(())
}

/// SHA-256 of a certificate's DER-encoded SubjectPublicKeyInfo.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let d = digest::digest(&digest::SHA256, parsed.public_key().raw);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

/// Parse a pin: 64 hex digits (either case; `:` separators allowed).
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(clean.trim()).map_err(|_| {
        "must be 64 hex digits (SHA-256 of the server's SubjectPublicKeyInfo)".to_string()
    })?;
    bytes.try_into().map_err(|_| {
        "must be 64 hex digits (SHA-256 of the server's SubjectPublicKeyInfo)".to_string()
    })
}

/// Build the client configuration: TLS 1.3 only, roots = the CA bundle only, the agent's
/// certificate and key (checked to match), and the SPKI pin if given.
pub fn client_config(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
    spki_pin: Option<[u8; 32]>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_ca(ca_file)?;
    let chain = load_cert_chain(cert_file)?;
    let key = load_private_key(key_file)?;
    client_config_from_parts(roots, chain, key, spki_pin, cert_file, key_file)
}

/// A PEM certificate signing request for `key`, with `name` as its common name (enrollment and
/// renewal; the control plane decides the identity it certifies).
pub fn csr_pem(key: &rcgen::KeyPair, name: &str) -> Result<String, String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("cannot build a CSR: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params
        .serialize_request(key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("cannot sign a CSR: {e}"))
}

/// Parse a PEM CA bundle held in memory (read from `path`, or from a renewal answer to be written
/// there); `path` names it in messages.
pub fn parse_ca_pem(pem: &[u8], path: &Path) -> Result<RootCertStore, TlsError> {
    let err = |reason: String| TlsError::Ca {
        path: path.to_path_buf(),
        reason,
    };
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| err(format!("not valid PEM: {e}")))?;
        store
            .add(cert)
            .map_err(|e| err(format!("not a usable CA certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(err("no PEM certificate found".into()));
    }
    Ok(store)
}

/// Parse a PEM certificate chain (leaf first) held in memory; `path` names it in messages.
pub fn parse_cert_pem(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not valid PEM: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| err("no PEM certificate found".into()))?;
    x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| err(format!("not a valid X.509 certificate: {e}")))?;
    Ok(chain)
}

/// As [`client_config`], from parts already read. `cert_file` and `key_file` name the files in
/// messages.
pub fn client_config_from_parts(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    spki_pin: Option<[u8; 32]>,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = Arc::new(roots);
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match spki_pin {
        None => webpki,
        Some(pin) => Arc::new(PinnedServerVerifier { inner: webpki, pin }),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert_file.to_path_buf(),
                key: key_file.to_path_buf(),
            },
            other => TlsError::Key {
                path: key_file.to_path_buf(),
                reason: format!("unusable with its certificate: {other}"),
            },
        })?;
    Ok(Arc::new(config))
}

/// The client configuration the next connection uses. Cheap to clone; every clone sees a
/// [`TlsHandle::replace`] (certificate reload or renewal). A connection already up keeps the
/// configuration it was made with.
#[derive(Clone)]
pub struct TlsHandle {
    current: Arc<std::sync::RwLock<Arc<ClientConfig>>>,
}

impl TlsHandle {
    pub fn new(config: Arc<ClientConfig>) -> TlsHandle {
        TlsHandle {
            current: Arc::new(std::sync::RwLock::new(config)),
        }
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Use `config` from the next connection on.
    pub fn replace(&self, config: Arc<ClientConfig>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }
}

impl From<Arc<ClientConfig>> for TlsHandle {
    fn from(config: Arc<ClientConfig>) -> TlsHandle {
        TlsHandle::new(config)
    }
}

impl std::fmt::Debug for TlsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsHandle")
    }
}

/// Validity window of a certificate, as system times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertValidity {
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
}

/// Read the validity window of a DER certificate.
pub fn cert_validity(cert: &CertificateDer<'_>) -> Result<CertValidity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let v = parsed.validity();
    let at = |t: i64| {
        if t >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64)
        } else {
            std::time::UNIX_EPOCH
        }
    };
    Ok(CertValidity {
        not_before: at(v.not_before.timestamp()),
        not_after: at(v.not_after.timestamp()),
    })
}

/// SHA-256 of a whole DER certificate (what `--ca-sha256` pins).
pub fn cert_sha256(cert: &CertificateDer<'_>) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, cert.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Full WebPKI verification against the configured roots first, then the SPKI pin of the
/// end-entity certificate. Signature checks are the WebPKI verifier's.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pin: [u8; 32],
}

impl PinnedServerVerifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>, pin: [u8; 32]) -> Self {
        PinnedServerVerifier { inner, pin }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let got = spki_sha256(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        // The pin is public (it is in the config file), so a plain comparison is fine.
        if got != self.pin {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    got: hex::encode(got),
                }))),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Trust on a pinned CA hash, for enrollment (no CA file yet): the server must present, in its
/// chain, a certificate whose SHA-256 (of the DER) equals the pin; that certificate becomes the
/// only root and the server certificate is verified against it by WebPKI (chain, validity, name).
#[derive(Debug)]
pub struct CaPinnedVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl CaPinnedVerifier {
    pub fn new(pin: [u8; 32]) -> Self {
        CaPinnedVerifier {
            pin,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for CaPinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pos) = intermediates
            .iter()
            .position(|c| cert_sha256(c) == self.pin)
        else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(CaPinMismatch {
                    presented: intermediates
                        .iter()
                        .map(|c| hex::encode(cert_sha256(c)))
                        .collect(),
                }))),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(intermediates[pos].clone().into_owned())
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, c)| c.clone())
            .collect();
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS 1.3 client configuration trusting only the CA whose hash is `pin` (enrollment).
pub fn ca_pinned_client_config(pin: [u8; 32]) -> Result<ClientConfig, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaPinnedVerifier::new(pin)))
        .with_no_client_auth();
    Ok(config)
}

/// The message of a pinned-CA failure (shown through rustls' `Debug`).
#[derive(Error)]
#[error("the server presented no CA certificate with the pinned sha256 (--ca-sha256); it presented {} other certificate(s){}", presented.len(), if presented.is_empty() { String::new() } else { format!(" with sha256 {}", presented.join(", ")) })]
struct CaPinMismatch {
    presented: Vec<String>,
}

impl std::fmt::Debug for CaPinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// rustls shows the inner error of `CertificateError::Other` with `Debug`, so `Debug` is the
/// message.
#[derive(Error)]
#[error("server certificate's SPKI sha256 {got} does not match control_plane.spki_pin")]
struct PinMismatch {
    got: String,
}

impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use std::io::Write;

    struct Pki {
        dir: tempfile::TempDir,
        ca_cert: rcgen::Certificate,
        ca_key: KeyPair,
    }

    impl Pki {
        fn new() -> Pki {
            Pki::named("test CA")
        }
        fn named(cn: &str) -> Pki {
            let ca_key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            let ca_cert = p.self_signed(&ca_key).unwrap();
            Pki {
                dir: tempfile::tempdir().unwrap(),
                ca_cert,
                ca_key,
            }
        }
        fn write(&self, name: &str, data: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(data.as_bytes()).unwrap();
            path
        }
        fn leaf(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
            let key = KeyPair::generate().unwrap();
            let mut p =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            p.distinguished_name.push(DnType::CommonName, names[0]);
            let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
            (cert, key)
        }
        fn files(&self) -> (PathBuf, PathBuf, PathBuf) {
            let (cert, key) = self.leaf(&["agent-1"]);
            (
                self.write("ca.pem", &self.ca_cert.pem()),
                self.write("agent.pem", &cert.pem()),
                self.write("agent.key", &key.serialize_pem()),
            )
        }
    }

    /// Handshake over an in-memory pipe against a server offering only `versions`.
    async fn handshake(
        pki: &Pki,
        client: Arc<ClientConfig>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<rustls::ProtocolVersion, String> {
        let (server_cert, server_key) = pki.leaf(&["localhost"]);
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let server_task = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = ServerName::try_from("localhost").unwrap();
        let result = connector
            .connect(name, a)
            .await
            .map(|s| s.get_ref().1.protocol_version().unwrap())
            .map_err(|e| e.to_string());
        let _ = server_task.await;
        result
    }

    #[tokio::test]
    async fn speaks_tls13_and_refuses_a_tls12_only_server() {
        let pki = Pki::new();
        let (ca, cert, key) = pki.files();
        let cfg = client_config(&ca, &cert, &key, None).unwrap();
        assert!(cfg.client_auth_cert_resolver.has_certs());
        let v = handshake(&pki, cfg.clone(), &[&rustls::version::TLS13]).await;
        assert_eq!(v, Ok(rustls::ProtocolVersion::TLSv1_3));
        let v = handshake(&pki, cfg, &[&rustls::version::TLS12]).await;
        assert!(v.is_err(), "a TLS 1.2-only server must be refused: {v:?}");
    }

    #[tokio::test]
    async fn pin_is_enforced_in_a_handshake() {
        let pki = Pki::new();
        let (ca, cert, key) = pki.files();
        let cfg = client_config(&ca, &cert, &key, Some([7u8; 32])).unwrap();
        let v = handshake(&pki, cfg, &[&rustls::version::TLS13]).await;
        assert!(v.unwrap_err().contains("spki_pin"));
    }

    #[test]
    fn errors_name_the_file() {
        let pki = Pki::new();
        let (ca, cert, key) = pki.files();
        let missing = pki.dir.path().join("nope.pem");
        let e = client_config(&missing, &cert, &key, None).unwrap_err();
        assert!(matches!(e, TlsError::Ca { .. }));
        assert!(e.to_string().contains("nope.pem"), "{e}");

        let garbage = pki.write("garbage.pem", "hello\n");
        let e = client_config(&garbage, &cert, &key, None).unwrap_err();
        assert!(
            e.to_string().contains("garbage.pem") && e.to_string().contains("no PEM"),
            "{e}"
        );
        let e = client_config(&ca, &garbage, &key, None).unwrap_err();
        assert!(
            matches!(e, TlsError::Cert { .. }) && e.to_string().contains("garbage.pem"),
            "{e}"
        );
        let e = client_config(&ca, &cert, &garbage, None).unwrap_err();
        assert!(
            matches!(e, TlsError::Key { .. }) && e.to_string().contains("garbage.pem"),
            "{e}"
        );
    }

    #[test]
    fn key_error_never_quotes_the_key() {
        let pki = Pki::new();
        let (ca, cert, _) = pki.files();
        let broken = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==!!\n-----END PRIVATE KEY-----\n";
        let key = pki.write("broken.key", broken);
        let e = client_config(&ca, &cert, &key, None)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let pki = Pki::new();
        let (ca, cert, _) = pki.files();
        let (_, other_key) = pki.leaf(&["other"]);
        let key = pki.write("other.key", &other_key.serialize_pem());
        let e = client_config(&ca, &cert, &key, None).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    }

    #[test]
    fn pins() {
        assert_eq!(parse_pin(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert_eq!(parse_pin(&"AB".repeat(32)).unwrap(), [0xab; 32]);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_pin(&colons).unwrap(), [0xab; 32]);
        assert!(parse_pin("abc").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert!(parse_pin(&"ab".repeat(33)).is_err());
    }

    fn verifier(pki: &Pki, pin: [u8; 32]) -> PinnedServerVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_cert.der().clone()).unwrap();
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        PinnedServerVerifier::new(inner, pin)
    }

    #[test]
    fn pinned_verifier_checks_chain_then_pin() {
        let pki = Pki::new();
        let (server, _) = pki.leaf(&["localhost"]);
        let der = server.der().clone();
        let name = ServerName::try_from("localhost").unwrap();
        let pin = spki_sha256(&der).unwrap();

        let ok = verifier(&pki, pin);
        ok.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .unwrap();

        let wrong = verifier(&pki, [0u8; 32]);
        let e = wrong
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(e.to_string().contains("spki_pin"), "{e}");

        // The chain is still checked: a certificate from another CA with the right pin fails.
        let other = Pki::named("another CA");
        let (foreign, _) = other.leaf(&["localhost"]);
        let foreign_der = foreign.der().clone();
        let v = verifier(&pki, spki_sha256(&foreign_der).unwrap());
        let e = v
            .verify_server_cert(&foreign_der, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{e}"
        );

        // And so is the name.
        let other_name = ServerName::try_from("example.com").unwrap();
        assert!(ok
            .verify_server_cert(&der, &[], &other_name, &[], UnixTime::now())
            .is_err());
    }

    #[tokio::test]
    async fn ca_pinned_config_accepts_the_pinned_ca_only_when_presented() {
        let pki = Pki::new();
        let (server_cert, server_key) = pki.leaf(&["localhost"]);
        let serve = |chain: Vec<CertificateDer<'static>>| {
            let key = PrivateKeyDer::try_from(server_key.serialize_der()).unwrap();
            Arc::new(
                rustls::ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .unwrap(),
            )
        };
        let connect = |server: Arc<rustls::ServerConfig>, pin: [u8; 32]| async move {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server);
            let t = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
            let client = Arc::new(ca_pinned_client_config(pin).unwrap());
            let r = tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), a)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = t.await;
            r
        };
        let ca_der = pki.ca_cert.der().clone();
        let pin = cert_sha256(&ca_der);
        let with_ca = serve(vec![server_cert.der().clone(), ca_der.clone()]);
        assert_eq!(connect(with_ca.clone(), pin).await, Ok(()));
        // Another hash: refused, naming what was presented.
        let e = connect(with_ca, [1u8; 32]).await.unwrap_err();
        assert!(
            e.contains("--ca-sha256") && e.contains(&hex::encode(pin)),
            "{e}"
        );
        // No CA in the chain: refused.
        let leaf_only = serve(vec![server_cert.der().clone()]);
        let e = connect(leaf_only, pin).await.unwrap_err();
        assert!(e.contains("--ca-sha256"), "{e}");
        // A server of another CA that appends the pinned CA to its chain is still refused.
        let other = Pki::named("another CA");
        let (foreign, foreign_key) = other.leaf(&["localhost"]);
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![foreign.der().clone(), ca_der],
                    PrivateKeyDer::try_from(foreign_key.serialize_der()).unwrap(),
                )
                .unwrap(),
        );
        assert!(connect(server, pin).await.is_err());
    }

    #[test]
    fn validity_window_is_read() {
        let pki = Pki::new();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["v".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2030, 1, 1);
        p.not_after = rcgen::date_time_ymd(2030, 1, 4);
        let cert = p.signed_by(&key, &pki.ca_cert, &pki.ca_key).unwrap();
        let v = cert_validity(cert.der()).unwrap();
        assert_eq!(
            v.not_after.duration_since(v.not_before).unwrap(),
            std::time::Duration::from_secs(3 * 86400)
        );
    }

    #[test]
    fn spki_hash_matches_key() {
        let pki = Pki::new();
        let (cert, key) = pki.leaf(&["x"]);
        let want = digest::digest(&digest::SHA256, &key.public_key_der());
        assert_eq!(&spki_sha256(cert.der()).unwrap()[..], want.as_ref());
    }

    #[test]
    fn expired_certificate_is_reported() {
        let pki = Pki::new();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["old".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let cert = p.signed_by(&key, &pki.ca_cert, &pki.ca_key).unwrap();
        let path = Path::new("old.pem");
        let e = check_validity(cert.der(), path).unwrap_err();
        assert!(
            e.to_string().contains("old.pem") && e.to_string().contains("not valid now"),
            "{e}"
        );
        let (fresh, _) = pki.leaf(&["new"]);
        check_validity(fresh.der(), path).unwrap();
    }
}
