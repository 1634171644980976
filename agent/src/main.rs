//! `delegate`: the agent binary. Parses arguments, loads the configuration, sets up logging, waits
//! for signals and maps errors to exit codes; everything else is library code.
//!
//! Exit codes: 0 clean stop, 1 a start-up failure of the environment, 2 a configuration error,
//! 130 a second signal during shutdown.

use anyhow::Context;
use clap::{Parser, Subcommand};
use delegate_agent::config::{self, Config, LogFormat};
use delegate_agent::daemon::{Agent, SandboxExecutor};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// How long `run` waits for the first Docker check before it starts connecting anyway.
const DOCKER_FIRST_WAIT: Duration = Duration::from_secs(30);
/// How often an unusable Docker sandbox is checked again.
const DOCKER_RETRY: Duration = Duration::from_secs(15);

#[derive(Parser)]
#[command(name = "delegate", about = "The Delegate agent daemon", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: connect to the control plane and run the tasks it sends.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Sandbox image commands.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Print the agent and protocol versions.
    Version,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (and its certificate files) without connecting.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Build a FROM-scratch sandbox image from a static tofu or terraform binary.
    BuildImage {
        #[arg(long)]
        from_binary: PathBuf,
        #[arg(long)]
        tag: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            let protocols: Vec<String> = delegate_protocol::SUPPORTED_VERSIONS
                .iter()
                .map(|v| format!("v{v}"))
                .collect();
            println!(
                "delegate {} (protocol {})",
                env!("CARGO_PKG_VERSION"),
                protocols.join(", ")
            );
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => config_check(&config),
        Command::Sandbox {
            command: SandboxCommand::BuildImage { from_binary, tag },
        } => with_runtime(async move {
            init_tracing(config::LogLevel::Info, LogFormat::Text);
            delegate_agent::sandbox::build_image_from_binary(&from_binary, &tag, &BTreeMap::new())
                .await
                .with_context(|| format!("cannot build sandbox image {tag}"))?;
            println!("built sandbox image {tag}");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Run { config } => run(&config),
    }
}

fn config_check(path: &std::path::Path) -> ExitCode {
    let mut problems = match config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            cfg.check_files()
                .into_iter()
                .map(|i| i.to_string())
                .collect()
        }
        Err(e) => e.issues(),
    };
    if problems.is_empty() {
        println!("config OK");
        return ExitCode::SUCCESS;
    }
    problems.sort();
    eprintln!("{}: {} error(s)", path.display(), problems.len());
    for p in problems {
        eprintln!("  {p}");
    }
    ExitCode::from(2)
}

fn with_runtime(f: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("delegate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("delegate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("delegate: {}", e.one_line());
            return ExitCode::from(2);
        }
    };
    with_runtime(run_agent(cfg))
}

async fn run_agent(cfg: Config) -> anyhow::Result<ExitCode> {
    // Signals first, so one that arrives during start-up is not lost.
    let mut term = signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install a SIGINT handler")?;

    init_tracing(cfg.log.level, cfg.log.format);
    for w in &cfg.warnings {
        warn!("{w}");
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        name = %cfg.agent.name,
        pool = %cfg.agent.pool,
        slots = cfg.agent.slots,
        control_plane = %cfg.control_plane.endpoint.url,
        "delegate agent starting"
    );
    let executor = SandboxExecutor::start(
        cfg.sandbox_settings(),
        cfg.agent.name.clone(),
        DOCKER_FIRST_WAIT,
        DOCKER_RETRY,
    )
    .await;
    let agent = match Agent::new(&cfg, executor) {
        Ok(a) => a,
        Err(e) if e.is_config() => {
            eprintln!("delegate: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };

    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "stopping (a second signal exits at once)");
        let _ = first_tx.send(());
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        warn!(signal = name, "second signal: exiting now");
        std::process::exit(130);
    });
    agent
        .run(async {
            let _ = first_rx.await;
        })
        .await;
    info!("delegate agent stopped");
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(level: config::LogLevel, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::new(level.as_str());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
