//! `delegate`: the agent binary. Parses arguments, loads the configuration, sets up logging, waits
//! for signals and maps errors to exit codes; everything else is library code.
//!
//! Signals while running: SIGTERM/SIGINT drains (no new task; running ones get
//! `agent.drain_timeout`), a second one cancels running tasks at once (cleanly), a third exits at
//! once; SIGHUP reloads certificates, the log level and the egress policy.
//!
//! Exit codes: 0 clean stop (or `doctor` found nothing failing), 1 a start-up failure of the
//! environment (or a failing `doctor` check, or a refused enrollment), 2 a configuration or usage
//! error, 130 a third signal during shutdown.

use anyhow::Context;
use clap::{Parser, Subcommand};
use delegate_agent::config::{self, Config, LogFormat};
use delegate_agent::daemon::{Agent, SandboxExecutor};
use delegate_agent::reload::EgressHook;
use delegate_agent::sandbox::egress_wiring::EgressPolicy;
use delegate_agent::sandbox::SandboxSettings;
use delegate_agent::service::{self, Control, Ended, ServiceParts};
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
    /// At-rest keys of the spool (data_dir/keys; or DELEGATE_SPOOL_KEY).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check this host: configuration, permissions, certificate, control plane, Docker, sandbox
    /// image, disk space, egress. One line per check; exits 1 if any check fails.
    Doctor {
        #[arg(long)]
        config: PathBuf,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the control plane and for Docker.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Enroll this host with a one-time token: generate the key here, get a certificate, write
    /// key, certificate, CA and a ready agent.toml into --out.
    Enroll {
        /// The control plane's HTTPS API URL ("url" of `delegate-cp tokens create --json`).
        #[arg(long)]
        url: String,
        /// The bootstrap token (or DELEGATE_ENROLL_TOKEN, which keeps it out of `ps`).
        #[arg(long, env = "DELEGATE_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// SHA-256 (hex) of the control plane's CA certificate ("ca_sha256").
        #[arg(long)]
        ca_sha256: String,
        /// The agent's name (default: the host's short name).
        #[arg(long)]
        name: Option<String>,
        /// Directory for agent.key (0600), agent.pem, ca.pem and agent.toml (created 0700).
        #[arg(long)]
        out: PathBuf,
        /// data_dir written into agent.toml (default: OUT/data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// When --out already holds an enrolled identity (agent.key, agent.pem and agent.toml),
        /// say so and exit 0 without contacting the control plane (the token is not used).
        #[arg(long)]
        if_absent: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new key current; spool files sealed under older keys stay readable.
    Rotate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Re-seal the spool's files under the current key (stop the agent first).
    Reseal {
        #[arg(long)]
        config: PathBuf,
    },
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
        Command::Keys { command } => keys_command(command),
        Command::Sandbox {
            command: SandboxCommand::BuildImage { from_binary, tag },
        } => with_runtime(async move {
            let _ = init_tracing(config::LogLevel::Info, LogFormat::Text);
            delegate_agent::sandbox::build_image_from_binary(&from_binary, &tag, &BTreeMap::new())
                .await
                .with_context(|| format!("cannot build sandbox image {tag}"))?;
            println!("built sandbox image {tag}");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Run { config } => run(&config),
        Command::Doctor {
            config,
            json,
            timeout,
        } => with_runtime(async move {
            let checks =
                delegate_agent::doctor::run(&config, Duration::from_secs(timeout.max(1))).await;
            if json {
                println!("{}", delegate_agent::doctor::render_json(&checks));
            } else {
                print!("{}", delegate_agent::doctor::render_text(&checks));
            }
            Ok(if delegate_agent::doctor::any_failed(&checks) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }),
        Command::Enroll {
            url,
            token,
            ca_sha256,
            name,
            out,
            data_dir,
            if_absent,
        } => enroll(url, token, ca_sha256, name, out, data_dir, if_absent),
    }
}

fn enroll(
    url: String,
    token: String,
    ca_sha256: String,
    name: Option<String>,
    out: PathBuf,
    data_dir: Option<PathBuf>,
    if_absent: bool,
) -> ExitCode {
    use delegate_agent::enroll::{self, EnrollError, EnrollRequest};
    if if_absent {
        if let Some(config) = enroll::existing_identity(&out) {
            println!(
                "already enrolled: {} holds agent.key, agent.pem and agent.toml (--if-absent: nothing sent, the token was not used)",
                out.display()
            );
            println!("configuration: {}", config.display());
            return ExitCode::SUCCESS;
        }
    }
    let Some(name) = name.or_else(enroll::default_name) else {
        eprintln!("delegate: the host name is not a usable agent name; pass --name");
        return ExitCode::from(2);
    };
    let req = EnrollRequest {
        url,
        token,
        ca_sha256,
        name,
        out,
        data_dir,
        timeout: Duration::from_secs(30),
    };
    with_runtime(async move {
        match enroll::enroll(&req).await {
            Ok(done) => {
                println!(
                    "enrolled as {} in pool {} (certificate valid until {})",
                    done.name,
                    done.pool,
                    humantime::format_rfc3339_seconds(done.not_after)
                );
                println!("control plane: {}", done.agent_url);
                println!("configuration: {}", done.config.display());
                println!(
                    "next: delegate doctor --config {0} && delegate run --config {0}",
                    done.config.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ EnrollError::Usage(_)) => {
                eprintln!("delegate enroll: {e}");
                Ok(ExitCode::from(2))
            }
            Err(e) => {
                eprintln!("delegate enroll: {e}");
                if e.is_retryable() {
                    eprintln!("(this may be temporary: the same token can be tried again)");
                }
                Ok(ExitCode::from(1))
            }
        }
    })
}

/// `DELEGATE_SPOOL_KEY`, read here and nowhere else; wiped when dropped.
fn spool_env_key() -> Option<zeroize::Zeroizing<String>> {
    std::env::var(delegate_agent::spool::keys::ENV_KEY)
        .ok()
        .map(zeroize::Zeroizing::new)
}

fn keys_command(command: KeysCommand) -> ExitCode {
    use delegate_agent::spool::keys;
    let (KeysCommand::Rotate { config } | KeysCommand::Reseal { config }) = &command;
    let cfg = match config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("delegate: {}", e.one_line());
            return ExitCode::from(2);
        }
    };
    match command {
        KeysCommand::Rotate { .. } => match keys::rotate(&cfg.data_dir) {
            Ok(id) => {
                println!(
                    "new current key {id} in {}; spool files sealed under older keys stay readable \
                     (`delegate keys reseal --config FILE` re-seals them)",
                    keys::key_dir(&cfg.data_dir).display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("delegate: cannot rotate the spool key: {e}");
                ExitCode::from(1)
            }
        },
        KeysCommand::Reseal { .. } => {
            let env_key = spool_env_key();
            let ring =
                match keys::load_existing(&cfg.data_dir, env_key.as_deref().map(String::as_str)) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("delegate: {e}");
                        return ExitCode::from(2);
                    }
                };
            match keys::reseal(&cfg.data_dir, &ring) {
                Ok(r) => {
                    println!(
                        "{} spool file(s) checked, {} rewritten ({} record(s) re-sealed under key {})",
                        r.files,
                        r.rewritten,
                        r.records,
                        ring.current_id()
                    );
                    for f in &r.failed {
                        eprintln!("delegate: not re-sealed: {f}");
                    }
                    if r.failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("delegate: {e}");
                    ExitCode::from(1)
                }
            }
        }
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
    let mut hup = signal(SignalKind::hangup()).context("cannot install a SIGHUP handler")?;

    let log_level = init_tracing(cfg.log.level, cfg.log.format);
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let (notifier, notify_error) = delegate_agent::notify::Notifier::from_env();
    if let Some(e) = notify_error {
        warn!(error = %e, "not notifying the service manager");
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        name = %cfg.agent.name,
        pool = %cfg.agent.pool,
        slots = cfg.agent.slots,
        control_plane = %cfg.control_plane.endpoint.url,
        "delegate agent starting"
    );
    let _ = notifier.status("checking Docker and the sandbox image");
    // The spool first: the tasks it still holds keep their containers through the cleanup.
    let spooled = {
        let env_key = spool_env_key();
        match delegate_agent::daemon::open_spool(&cfg, env_key.as_deref().map(String::as_str)) {
            Ok(s) => s,
            Err(e) if e.is_config() => {
                eprintln!("delegate: {e}");
                return Ok(ExitCode::from(2));
            }
            Err(e) => return Err(e.into()),
        }
    };
    // The sandbox and the SIGHUP reload share one egress policy handle.
    let (sandbox_settings, egress_hook) = sandbox_settings_with_egress_hook(&cfg);
    let executor = SandboxExecutor::start(
        sandbox_settings,
        cfg.agent.name.clone(),
        spooled.live_tasks(),
        DOCKER_FIRST_WAIT,
        DOCKER_RETRY,
    )
    .await;
    let agent = match Agent::new(&cfg, executor.clone(), spooled) {
        Ok(a) => a,
        Err(e) if e.is_config() => {
            eprintln!("delegate: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    let mut reloader = delegate_agent::reload::Reloader::new(cfg.clone(), agent.tls())
        .with_egress_hook(egress_hook);
    if let Some(hook) = log_level {
        reloader = reloader.with_log_level_hook(hook);
    }
    let parts = ServiceParts {
        notifier,
        metrics: delegate_agent::metrics::global().clone(),
        metrics_listen: cfg.metrics.clone(),
        reloader: Some(reloader),
        executor,
    };

    let (control_tx, control_rx) = tokio::sync::mpsc::channel::<Control>(8);
    tokio::spawn(async move {
        loop {
            let (request, name) = tokio::select! {
                _ = term.recv() => (Control::Stop, "SIGTERM"),
                _ = int.recv() => (Control::Stop, "SIGINT"),
                _ = hup.recv() => (Control::Reload, "SIGHUP"),
            };
            info!(signal = name, "signal received");
            if control_tx.send(request).await.is_err() {
                return;
            }
        }
    });
    match service::run(agent, parts, control_rx).await {
        Ended::Clean => {
            info!("delegate agent stopped");
            Ok(ExitCode::SUCCESS)
        }
        Ended::Forced => {
            warn!("third stop signal: exiting now");
            Ok(ExitCode::from(130))
        }
    }
}

/// The sandbox's settings, and the SIGHUP hook that replaces the egress policy (`allow`/`deny`)
/// those settings carry: both hold the same [`EgressPolicy`] handle, so tasks the sandbox starts
/// after a reload get the new rules (running tasks keep the policy they started with).
fn sandbox_settings_with_egress_hook(cfg: &Config) -> (SandboxSettings, EgressHook) {
    let settings = cfg.sandbox_settings();
    let policy: EgressPolicy = settings.egress.policy.clone();
    let hook: EgressHook = std::sync::Arc::new(move |egress: &config::EgressConfig| {
        // Already parsed and validated with the rest of the file (a bad rule refuses the reload).
        policy.replace(egress.policy.clone());
        let now = policy.current();
        info!(
            allow = now.allow.len(),
            deny = now.deny.len(),
            "egress policy replaced; tasks started from now on use it"
        );
        Ok(())
    });
    (settings, hook)
}

/// The agent's log filter for `level`, with the crates that log payloads (tungstenite: every
/// `assign`, secrets included; bollard: every container configuration, environment included)
/// capped at `info` ([`delegate_protocol::logging`]).
fn log_filter(level: config::LogLevel) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::new(delegate_protocol::logging::capped_directives(
        level.as_str(),
    ))
}

/// Set up the agent's own log; returns the hook that changes its level (SIGHUP).
fn init_tracing(
    level: config::LogLevel,
    format: LogFormat,
) -> Option<delegate_agent::reload::LogLevelHook> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(log_filter(level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    installed.ok()?;
    Some(std::sync::Arc::new(move |level: config::LogLevel| {
        handle
            .modify(|f| *f = log_filter(level))
            .map_err(|e| e.to_string())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_level_never_lets_payload_logging_crates_through() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry()
            .with(log_filter(config::LogLevel::Trace))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "tungstenite::protocol", "Received message {{\"secrets\":\"s3cret-1\"}}");
            tracing::debug!(target: "bollard::docker", "request body Env=[TOKEN=s3cret-2]");
            tracing::info!(target: "bollard::docker", "info from bollard");
            tracing::trace!(target: "delegate_agent::link", "agent trace line");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("info from bollard"), "{text}");
        assert!(text.contains("agent trace line"), "{text}");
    }

    fn load(dir: &std::path::Path, allow: &str) -> Config {
        let text = format!(
            "data_dir = \"data\"\n[control_plane]\nurl = \"wss://127.0.0.1:8443/v1/agent\"\n\
             ca_file = \"ca.pem\"\ncert_file = \"agent.pem\"\nkey_file = \"agent.key\"\n\
             [agent]\nname = \"runner-1\"\n[egress]\nallow = [{allow}]\n"
        );
        config::load_str(
            &text,
            &dir.join("agent.toml"),
            dir,
            Some(Default::default()),
        )
        .unwrap()
    }

    /// The hook the binary installs changes the policy of the very settings the sandbox is
    /// started with, not a copy.
    #[test]
    fn the_egress_hook_replaces_the_sandbox_settings_policy() {
        let dir = std::path::Path::new("/etc/delegate");
        let old = load(dir, "\"a.example:443\"");
        let new = load(dir, "\"b.example:443\", \"10.0.0.0/8\"");
        let (settings, hook) = sandbox_settings_with_egress_hook(&old);
        // The sandbox clones its settings (e.g. on every start attempt); clones share the handle.
        let sandbox_copy = settings.clone();
        assert_eq!(*sandbox_copy.egress.policy.current(), old.egress.policy);
        hook(&new.egress).unwrap();
        assert_eq!(*sandbox_copy.egress.policy.current(), new.egress.policy);
        assert_eq!(sandbox_copy.egress.policy.current().allow.len(), 2);
        assert_ne!(old.egress.policy, new.egress.policy);
    }
}
