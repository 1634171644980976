//! Certificates and raw TLS clients for refusal tests.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A fresh self-signed CA (not the control plane's).
pub fn new_ca(cn: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// The control plane's CA, loaded from its data dir, able to sign test certificates.
pub fn load_ca(cp_dir: &Path) -> (rcgen::Certificate, KeyPair) {
    let cert_pem = std::fs::read_to_string(cp_dir.join("tls/ca.pem")).unwrap();
    let key_pem = std::fs::read_to_string(cp_dir.join("tls/ca.key")).unwrap();
    let key = KeyPair::from_pem(&key_pem).unwrap();
    let params = CertificateParams::from_ca_cert_pem(&cert_pem).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// A client certificate with CN `cn` signed by `ca`; `expired` puts its validity in the past.
pub fn client_cert(ca: &(rcgen::Certificate, KeyPair), cn: &str, expired: bool) -> Issued {
    let mut params = CertificateParams::new(vec![cn.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A server certificate for 127.0.0.1/localhost signed by `ca`.
pub fn server_cert(ca: &(rcgen::Certificate, KeyPair)) -> Issued {
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "test-server");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client trusting the control plane's CA, speaking only `versions`, presenting `identity`.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&Issued>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        Some(id) => {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// A rustls server speaking only `versions`, not asking for client certificates.
pub fn server_config(
    identity: &Issued,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ServerConfig> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// Try a TLS handshake to `addr` (then a WebSocket upgrade on /v1/agent); Ok means the control
/// plane let us in, Err carries why not.
pub async fn try_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    String,
> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let url = format!("wss://127.0.0.1:{}/v1/agent", addr.port());
    // With TLS 1.3 the server checks the client certificate after the client thinks the handshake is
    // done, so a refusal often shows up here, at the first read.
    let (ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(|e| format!("websocket: {e}"))?;
    Ok(ws)
}
