//! `delegate-cp`: the reference control plane and its CLI. Parses arguments, sets up logging and
//! calls the library; every command's logic lives in `delegate_controlplane`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use delegate_controlplane::cli;
use delegate_controlplane::client::ApiClient;
use delegate_controlplane::config::DataDir;
use delegate_controlplane::init::InitOptions;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "delegate-cp",
    version,
    about = "Delegate reference control plane"
)]
struct Cli {
    /// The control plane's data directory.
    #[arg(long, global = true, env = "DELEGATE_CP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: CA, server certificate, API token and agent bundles.
    Init {
        /// Create a bundle DIR/agents/NAME for this agent (repeatable).
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
        /// Agent endpoint address (default 127.0.0.1:8443).
        #[arg(long, value_name = "ADDR")]
        agent_listen: Option<String>,
        /// User API address (default 127.0.0.1:8444).
        #[arg(long, value_name = "ADDR")]
        api_listen: Option<String>,
        /// Extra name or IP for the server certificate (repeatable); the first one goes into
        /// the agents' URL.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Serve the agent endpoint and the user API.
    Serve,
    /// List agents.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// List audit records.
    Audit {
        /// Only records about this task.
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delegate-cp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let dd = DataDir::new(
        cli.data_dir
            .context("no data directory: pass --data-dir DIR or set DELEGATE_CP_DATA_DIR")?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let out = match cli.command {
        Command::Init {
            agents,
            agent_listen,
            api_listen,
            sans,
        } => cli::init(
            &dd,
            &InitOptions {
                agents,
                agent_listen,
                api_listen,
                sans,
            },
        )?,
        Command::Serve => {
            rt.block_on(delegate_controlplane::serve::serve(&dd, shutdown_signal()))?;
            String::new()
        }
        command => rt.block_on(async {
            let client = ApiClient::from_data_dir(&dd)?;
            match command {
                Command::Agents { json } => cli::agents(&client, json).await,
                Command::Audit { task, json } => cli::audit(&client, task.as_deref(), json).await,
                Command::Init { .. } | Command::Serve => unreachable!("handled above"),
            }
        })?,
    };
    print!("{out}");
    Ok(())
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}
