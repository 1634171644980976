//! The CLI's client for the user API: finds the address, token and CA in the data directory and
//! speaks HTTPS (TLS 1.3 only, trusting only `DIR/tls/ca.pem`).
//!
//! Owns: turning HTTP failures into messages a user can act on. Never prints the token.

use crate::config::{CpConfig, DataDir};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use thiserror::Error;

/// Errors talking to the API. `Unreachable` is retryable (the server may be starting); `Api`
/// carries the server's own message and status.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach the control plane at {url}: {reason} (is `delegate-cp serve` running?)")]
    Unreachable { url: String, reason: String },
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("bad response from the control plane: {0}")]
    BadResponse(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// Build from a data directory: `listen.json` (written by a running `serve`) or the config
    /// for the address, `api-token`, `tls/ca.pem`.
    pub fn from_data_dir(dd: &DataDir) -> Result<ApiClient, ClientError> {
        if !dd.config().exists() {
            return Err(ClientError::Setup(format!(
                "{} is not a control plane data directory (no {}); pass --data-dir or set DELEGATE_CP_DATA_DIR",
                dd.root.display(),
                crate::config::CONFIG_FILE
            )));
        }
        let addr = match api_addr_from_listen_file(dd) {
            Some(a) => a,
            None => CpConfig::load(&dd.config())
                .map_err(|e| ClientError::Setup(e.to_string()))?
                .api_addr(),
        };
        let token = std::fs::read_to_string(dd.api_token())
            .map_err(|e| ClientError::Setup(format!("{}: {e}", dd.api_token().display())))?
            .trim()
            .to_string();
        let tls = crate::tls::api_client_config(&dd.ca_cert())
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| ClientError::Setup(format!("HTTP client: {e}")))?;
        Ok(ApiClient {
            base: base_url(addr),
            token,
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp =
            req.bearer_auth(&self.token)
                .send()
                .await
                .map_err(|e| ClientError::Unreachable {
                    url: self.base.clone(),
                    reason: error_chain(&e),
                })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        Err(ClientError::Api { status, message })
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        Ok(resp
            .bytes()
            .await
            .map_err(|e| ClientError::BadResponse(e.to_string()))?
            .to_vec())
    }

    /// A response whose body the caller streams.
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self.send(self.http.post(self.url(path)).json(body)).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(self.http.delete(self.url(path))).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let resp = self
            .send(
                self.http
                    .put(self.url(path))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body),
            )
            .await?;
        resp.json()
            .await
            .map_err(|e| ClientError::BadResponse(e.to_string()))
    }
}

fn api_addr_from_listen_file(dd: &DataDir) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(dd.listen_file()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("api")?.as_str()?.parse().ok()
}

/// The URL for an API address; an unspecified bind address means "this host" (loopback, which
/// the server certificate always names).
pub fn base_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("https://{}", SocketAddr::new(ip, addr.port()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_becomes_loopback() {
        assert_eq!(
            base_url("0.0.0.0:8444".parse().unwrap()),
            "https://127.0.0.1:8444"
        );
        assert_eq!(base_url("[::]:1".parse().unwrap()), "https://[::1]:1");
        assert_eq!(
            base_url("10.1.2.3:9".parse().unwrap()),
            "https://10.1.2.3:9"
        );
    }
}
