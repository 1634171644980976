//! Direct calls to the control plane's user API, for what the CLI deliberately does not offer
//! (hand-made hostile archives, pushing a state behind tofu's back, holding a workspace lock).

use crate::ControlPlane;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use std::sync::Arc;

pub struct Api {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(cp: &ControlPlane) -> Api {
        let ca = std::fs::read(cp.path().join("tls/ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap();
        let token = std::fs::read_to_string(cp.path().join("api-token"))
            .unwrap()
            .trim()
            .to_string();
        Api {
            base: format!("https://127.0.0.1:{}", cp.api_port),
            token,
            client,
        }
    }

    /// Send a request; returns the status and the body (JSON when it parses, else a string).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            path,
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(
            reqwest::Method::PUT,
            path,
            Some(body.to_string().into_bytes()),
        )
        .await
    }
}
