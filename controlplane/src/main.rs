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
    /// Everything on embedded defaults in a temporary directory: a control plane, an agent, and a
    /// plan then apply of the example workspace in a Docker sandbox.
    Demo {
        /// Sandbox image to use; built locally from tofu/terraform on PATH when missing.
        #[arg(long, default_value = "delegate-sandbox:local")]
        image: String,
        /// The agent binary (default: `delegate` next to delegate-cp, then on PATH).
        #[arg(long, value_name = "PATH")]
        agent_bin: Option<PathBuf>,
        /// Keep the temporary data directory instead of removing it.
        #[arg(long)]
        keep: bool,
        /// Extra label KEY=VALUE on every Docker object the demo's agent creates (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// List agents, or revoke one.
    Agents {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<AgentsAction>,
    },
    /// Bootstrap tokens for `delegate enroll`.
    Tokens {
        #[command(subcommand)]
        action: TokensAction,
    },
    /// Pack a workspace directory and submit a task.
    Submit {
        /// The workspace directory.
        dir: PathBuf,
        /// plan, apply, destroy, validate or drift.
        #[arg(long)]
        op: String,
        /// Workspace name (default: the directory's name).
        #[arg(long)]
        workspace: Option<String>,
        /// Agent pool (default: the control plane's default_pool).
        #[arg(long)]
        pool: Option<String>,
        /// A variable, k=v (repeatable).
        #[arg(long = "var", value_name = "K=V")]
        vars: Vec<String>,
        /// A .tfvars file to pass with -var-file (repeatable).
        #[arg(long = "var-file", value_name = "FILE")]
        var_files: Vec<PathBuf>,
        /// An environment variable for the sandbox, K=V (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// A secret environment variable, NAME=VALUE (repeatable; redacted everywhere).
        #[arg(long = "secret", value_name = "NAME=VALUE")]
        secrets: Vec<String>,
        /// Pass this environment variable of yours as a secret (repeatable).
        #[arg(long = "secret-env", value_name = "NAME")]
        secret_env: Vec<String>,
        /// Plan then apply in one task.
        #[arg(long)]
        auto_approve: bool,
        /// Task timeout in seconds (default: the agent's).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Stream the logs, print the outcome, exit non-zero unless it succeeded.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// List tasks.
    Tasks {
        #[arg(long)]
        json: bool,
    },
    /// Show one task.
    Show {
        task: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a task's logs.
    Logs {
        task: String,
        /// Keep printing until the task finishes.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a task.
    Cancel {
        task: String,
        #[arg(long)]
        json: bool,
    },
    /// Turn a finished plan into an apply task; prints its id.
    Approve {
        task: String,
        #[arg(long)]
        json: bool,
    },
    /// List a workspace's state versions, or print one.
    State {
        workspace: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// List audit records.
    Audit {
        /// Only records about this task.
        #[arg(long)]
        task: Option<String>,
        /// Check the hash chain instead of listing.
        #[arg(long, conflicts_with = "task")]
        verify: bool,
        #[arg(long)]
        json: bool,
    },
    /// Workspace secrets: stored sealed, merged into every task of the workspace.
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
    },
    /// At-rest keys (DIR/keys, or DELEGATE_CP_KEY).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Subcommand)]
enum SecretsAction {
    /// Store (or replace) a secret; the value comes from --from-env, --value, or standard input.
    Set {
        workspace: String,
        name: String,
        /// Read the value from this environment variable.
        #[arg(long, value_name = "VAR", conflicts_with = "value")]
        from_env: Option<String>,
        /// The value itself (visible to other local users in the process list).
        #[arg(long, value_name = "V")]
        value: Option<String>,
    },
    /// List a workspace's secret names (never values).
    List {
        workspace: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    Rm { workspace: String, name: String },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make a new key current; data sealed under older keys stays readable.
    Rotate {
        #[arg(long)]
        json: bool,
    },
    /// Re-seal everything stored under the current key.
    Reseal {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentsAction {
    /// Revoke an agent: close its connection now and refuse it from then on.
    Revoke {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokensAction {
    /// Make a bootstrap token for a pool (its value is printed once and never stored).
    Create {
        /// The pool enrolled agents join.
        #[arg(long)]
        pool: String,
        /// How long the token can be used, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = delegate_controlplane::tokens::DEFAULT_TTL)]
        ttl: String,
        /// How many agents can enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Enrolled names must start with this (and are made from it when an agent gives none).
        #[arg(long, value_name = "PREFIX")]
        name_prefix: Option<String>,
        /// Print {"token", "url", "ca_sha256", ...}.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their values).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; the control plane it runs in-process only speaks up for problems.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    // RUST_LOG or the default, with the crates that log payloads (an `assign` with its secrets,
    // state bodies) capped at info whatever is asked for.
    let requested = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default_level.to_string());
    let filter = tracing_subscriber::EnvFilter::new(delegate_protocol::logging::capped_directives(
        &requested,
    ));
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
    if let Command::Demo {
        image,
        agent_bin,
        keep,
        labels,
    } = &cli.command
    {
        let labels = labels
            .iter()
            .map(|l| {
                l.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--label takes KEY=VALUE, got {l:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let opts = delegate_controlplane::demo::DemoOptions {
            image: image.clone(),
            agent_bin: agent_bin.clone(),
            keep: *keep,
            labels,
        };
        let mut stdout = std::io::stdout();
        rt.block_on(delegate_controlplane::demo::run(&opts, &mut stdout))?;
        return Ok(());
    }
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
        Command::Keys { action } => {
            let env_key = std::env::var(delegate_controlplane::at_rest::KEY_ENV)
                .ok()
                .map(zeroize::Zeroizing::new);
            let env_key = env_key.as_deref().map(String::as_str);
            rt.block_on(async {
                match action {
                    KeysAction::Rotate { json } => {
                        delegate_controlplane::cli_admin::keys_rotate(&dd, env_key, json).await
                    }
                    KeysAction::Reseal { json } => {
                        delegate_controlplane::cli_admin::keys_reseal(&dd, env_key, json).await
                    }
                }
            })?
        }
        command => rt.block_on(async {
            let client = ApiClient::from_data_dir(&dd)?;
            let mut stdout = std::io::stdout();
            let mut stderr = std::io::stderr();
            match command {
                Command::Agents {
                    action: Some(AgentsAction::Revoke { name, json }),
                    ..
                } => delegate_controlplane::revoke::cli_revoke(&client, &name, json).await,
                Command::Agents { json, action: None } => cli::agents(&client, json).await,
                Command::Tokens { action } => match action {
                    TokensAction::Create {
                        pool,
                        ttl,
                        uses,
                        name_prefix,
                        json,
                    } => {
                        let req = delegate_controlplane::tokens::CreateTokenRequest {
                            pool: Some(pool),
                            ttl: Some(ttl),
                            uses: Some(uses),
                            name_prefix,
                        };
                        delegate_controlplane::tokens::cli_create(&client, &req, json).await
                    }
                    TokensAction::List { json } => {
                        delegate_controlplane::tokens::cli_list(&client, json).await
                    }
                    TokensAction::Revoke { id, json } => {
                        delegate_controlplane::tokens::cli_revoke(&client, &id, json).await
                    }
                },
                Command::Audit {
                    verify: true, json, ..
                } => cli::audit_verify(&client, json).await,
                Command::Audit { task, json, .. } => {
                    cli::audit(&client, task.as_deref(), json).await
                }
                Command::Submit {
                    dir,
                    op,
                    workspace,
                    pool,
                    vars,
                    var_files,
                    env,
                    secrets,
                    secret_env,
                    auto_approve,
                    timeout,
                    follow,
                    json,
                } => {
                    let args = cli::SubmitArgs {
                        dir,
                        op,
                        workspace,
                        pool,
                        vars,
                        var_files,
                        env,
                        secrets,
                        secret_env,
                        auto_approve,
                        timeout,
                        follow,
                        json,
                    };
                    cli::submit(&client, &args, &mut stdout, &mut stderr)
                        .await
                        .map(|()| String::new())
                }
                Command::Tasks { json } => cli::tasks(&client, json).await,
                Command::Show { task, json } => cli::show(&client, &task, json).await,
                Command::Logs { task, follow } => cli::logs(&client, &task, follow, &mut stdout)
                    .await
                    .map(|()| String::new()),
                Command::Cancel { task, json } => cli::cancel(&client, &task, json).await,
                Command::Approve { task, json } => cli::approve(&client, &task, json).await,
                Command::State {
                    workspace,
                    version,
                    json,
                } => cli::state(&client, &workspace, version, json).await,
                Command::Secrets { action } => {
                    use delegate_controlplane::cli_admin::{self as admin, SecretSource};
                    match action {
                        SecretsAction::Set {
                            workspace,
                            name,
                            from_env,
                            value,
                        } => {
                            let source = match (from_env, value) {
                                (Some(var), _) => SecretSource::Env(var),
                                (None, Some(v)) => SecretSource::Value(v),
                                (None, None) => SecretSource::Stdin,
                            };
                            let value = admin::secret_value(
                                &source,
                                |n| std::env::var(n).ok(),
                                &mut std::io::stdin().lock(),
                            )?;
                            admin::secrets_set(&client, &workspace, &name, &value).await
                        }
                        SecretsAction::List { workspace, json } => {
                            admin::secrets_list(&client, &workspace, json).await
                        }
                        SecretsAction::Rm { workspace, name } => {
                            admin::secrets_rm(&client, &workspace, &name).await
                        }
                    }
                }
                Command::Init { .. }
                | Command::Serve
                | Command::Demo { .. }
                | Command::Keys { .. } => {
                    unreachable!("handled above")
                }
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
