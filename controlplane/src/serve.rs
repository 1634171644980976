//! `delegate-cp serve`: load the data directory, bind both listeners, run the agent endpoint and
//! the user API until shutdown, then close every agent connection and record it.
//!
//! Owns: startup order and shutdown. Never exits with agents still shown connected.

use crate::config::{ConfigError, CpConfig, DataDir};
use crate::cp::{ControlPlane, CpError};
use crate::tls::TlsError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// Errors starting the control plane. `Bind` may be retryable (address in use); others need a fix.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "{0} is not a control plane data directory (run `delegate-cp init --data-dir {0}` first)"
    )]
    NotInitialised(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cp(#[from] CpError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A running control plane (in-process; `serve` wraps it for the binary).
pub struct Running {
    pub cp: Arc<ControlPlane>,
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

/// Bind and start serving; returns once both listeners are up. The at-rest keys are
/// `DIR/keys/` plus `DELEGATE_CP_KEY` when set.
pub async fn start(dd: &DataDir) -> Result<Running, ServeError> {
    let env_key = std::env::var(crate::at_rest::KEY_ENV)
        .ok()
        .map(zeroize::Zeroizing::new);
    start_with_key(dd, env_key.as_deref().map(String::as_str)).await
}

/// [`start`] with the environment key given explicitly (`None`: key files only).
pub async fn start_with_key(dd: &DataDir, env_key: Option<&str>) -> Result<Running, ServeError> {
    if !dd.config().exists() {
        return Err(ServeError::NotInitialised(dd.root.display().to_string()));
    }
    let config = CpConfig::load(&dd.config())?;
    let agent_tls =
        crate::tls::agent_server_config(&dd.ca_cert(), &dd.server_cert(), &dd.server_key())?;
    let api_tls =
        crate::tls::api_server_config(&dd.ca_cert(), &dd.server_cert(), &dd.server_key())?;
    let token = std::fs::read_to_string(dd.api_token())
        .map_err(|source| ServeError::Io {
            path: dd.api_token().display().to_string(),
            source,
        })?
        .trim()
        .to_string();

    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { what, addr, source })
    };
    let agent_listener = bind("agent endpoint", config.agent_addr()).await?;
    let api_listener = bind("user API", config.api_addr()).await?;
    let agent_addr = local_addr(&agent_listener, "agent endpoint")?;
    let api_addr = local_addr(&api_listener, "user API")?;

    let at_rest = crate::at_rest::AtRest::load(&dd.keys_dir(), env_key)
        .map_err(|e| ServeError::Cp(CpError::AtRest(e)))?;
    let cp = Arc::new(ControlPlane::open(dd.clone(), config, at_rest)?);
    // Whatever the database says from a previous run, nobody is connected now.
    if let Err(e) = cp
        .store
        .all_disconnected("control plane restarted", crate::now_ms())
    {
        tracing::error!(error = %e, "cannot reset agent states");
    }
    cp.on_start();

    let listen = serde_json::json!({
        "agent": agent_addr.to_string(),
        "api": api_addr.to_string(),
        "pid": std::process::id(),
    });
    std::fs::write(dd.listen_file(), listen.to_string()).map_err(|source| ServeError::Io {
        path: dd.listen_file().display().to_string(),
        source,
    })?;

    let app = crate::api::router(cp.clone(), token);
    let tasks = vec![
        tokio::spawn(crate::agent_link::serve(
            cp.clone(),
            agent_listener,
            TlsAcceptor::from(agent_tls),
        )),
        tokio::spawn(crate::api::serve(
            api_listener,
            TlsAcceptor::from(api_tls),
            app,
        )),
        tokio::spawn(crate::cp::run_dispatcher(cp.clone())),
        tokio::spawn(crate::lease::run_leases(cp.clone())),
    ];
    tracing::info!(agent = %agent_addr, api = %api_addr, data_dir = %dd.root.display(), "control plane serving");
    Ok(Running {
        cp,
        agent_addr,
        api_addr,
        tasks,
    })
}

fn local_addr(l: &TcpListener, what: &'static str) -> Result<SocketAddr, ServeError> {
    l.local_addr().map_err(|source| ServeError::Bind {
        what,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

impl Running {
    /// Stop accepting, close every agent connection (recording why), and wait briefly for them.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        let closers: Vec<_> = {
            let mut hub = self.cp.hub();
            hub.agents
                .values_mut()
                .filter_map(|c| c.close.take())
                .collect()
        };
        for c in closers {
            let _ = c.send("control plane shutting down".into());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.cp.hub().agents.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(e) = self
            .cp
            .store
            .all_disconnected("control plane shutting down", crate::now_ms())
        {
            tracing::error!(error = %e, "cannot record disconnections at shutdown");
        }
        let _ = std::fs::remove_file(self.cp.dd.listen_file());
        tracing::info!("control plane stopped");
    }
}

/// Run until `shutdown` completes.
pub async fn serve(dd: &DataDir, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let running = start(dd).await?;
    shutdown.await;
    running.shutdown().await;
    Ok(())
}
