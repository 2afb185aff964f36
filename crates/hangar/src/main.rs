//! `hangar`: the command line of the Hangar platform.
//!
//! This crate is glue: it parses arguments, finds `$HANGAR_HOME`, calls into
//! the library crates and prints results. One file per subcommand. It holds
//! no logic of its own; anything worth testing without the CLI belongs in a
//! library crate.
//!
//! Errors print as one line, `hangar: <what failed>: <why>`, and exit 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod apply;
mod apps;
mod bridges;
mod client;
mod dashboard;
mod demo;
mod edge;
mod egress;
mod image;
mod images;
mod machine;
mod metrics;
mod node;
mod node_config;
mod progress;
mod registry;
mod ssh;
mod tunnel;
mod up;

/// Hangar: run OCI images as isolated machines on your own servers.
#[derive(Parser)]
#[command(name = "hangar", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull, build, push, inspect and unpack OCI images (no Docker daemon needed).
    Image(image::ImageArgs),
    /// Run Hangar's multi-tenant OCI registry and manage its tokens.
    Registry(registry::RegistryArgs),
    /// Run the edge proxy: routing, load balancing, health checks and a CDN cache.
    Edge(edge::EdgeArgs),
    /// Run the SSRF-safe egress proxy (Smokescreen-compatible ACLs).
    Egress(egress::EgressArgs),
    /// Org tokens for the node's API and registry.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Run a node: state store, Machines API, registry (in the foreground).
    Up(up::UpArgs),
    /// Stop this host's node and everything it runs, or remove its data.
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// Run and manage machines on the node.
    Machine(machine::MachineArgs),
    /// The tour: start a node, build and deploy the example app, serve it until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Create an app and write its hangar.toml (from an image or this directory).
    Launch(apps::LaunchArgs),
    /// Build (when needed), push and roll out the app in hangar.toml.
    Deploy(apps::DeployArgs),
    /// The app's machines, their health, image and release.
    Status(apps::AppFlag),
    /// The app's releases, newest first.
    Releases(apps::AppFlag),
    /// The app's logs, every machine's lines prefixed with its id.
    Logs {
        #[command(flatten)]
        app: apps::AppFlag,
        /// Keep following
        #[arg(short, long)]
        follow: bool,
    },
    /// Set the number of machines or their memory.
    Scale {
        #[command(flatten)]
        app: apps::AppFlag,
        #[command(subcommand)]
        command: apps::ScaleCommand,
    },
    /// Purge the app's cached responses at every edge of the cluster.
    Cache {
        #[command(flatten)]
        app: apps::AppFlag,
        #[command(subcommand)]
        command: apps::CacheCommand,
    },
    /// A terminal in a running machine of the app (`ssh console`).
    Ssh {
        #[command(subcommand)]
        command: ssh::SshCommand,
    },
    /// A terminal in a new, short-lived machine of the app's current release (console_command).
    Console(ssh::ConsoleMachineArgs),
    /// Forward a local TCP port to a port of one of the app's machines, through the node.
    Proxy(tunnel::ProxyArgs),
    /// Open the app's dashboards (drawn by the node, live) in a browser.
    Dashboard(dashboard::DashboardArgs),
    /// The app's alert rules, what fires now, and its webhook's last post.
    Alerts(dashboard::AlertsArgs),
    /// Query the metrics of your org's apps (PromQL, through the node's Prometheus).
    Metrics {
        #[command(subcommand)]
        command: metrics::MetricsCommand,
    },
    /// Set, list and unset the app's secrets (encrypted at rest, never shown).
    Secrets {
        #[command(flatten)]
        app: apps::AppFlag,
        #[command(subcommand)]
        command: apps::SecretsCommand,
    },
    /// List or destroy apps.
    Apps {
        /// Print JSON for scripts
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: apps::AppsCommand,
    },
    /// Print the app's URL (and open it in a browser when there is one).
    Open(apps::AppFlag),
    /// Merge a lazy code edit (`// ... existing code ...` markers) into a file; exit 2 when it refuses.
    Apply(apply::ApplyArgs),
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Create, list and revoke org tokens (an org token reaches its org's apps, machines and images)
    Token {
        #[command(subcommand)]
        command: registry::TokenCommand,
    },
    /// Log the org in to another registry: the node pulls the org's images from there with it (an org token's call)
    RegistryLogin {
        /// The registry, as image references name it (host or host:port)
        registry: String,
        #[arg(long, short = 'u')]
        username: String,
        /// Read the password from standard input (else $HANGAR_REGISTRY_PASSWORD)
        #[arg(long)]
        password_stdin: bool,
    },
    /// List the org's registry logins (registries and user names)
    RegistryLogins,
    /// Forget the org's login to a registry
    RegistryLogout { registry: String },
}

/// `$HANGAR_HOME`, or `~/.hangar`.
pub fn home() -> anyhow::Result<PathBuf> {
    if let Some(h) = std::env::var_os("HANGAR_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".hangar")),
        None => anyhow::bail!("neither HANGAR_HOME nor HOME is set; set HANGAR_HOME to the directory Hangar should keep its data in"),
    }
}

/// Resolves on SIGINT or SIGTERM: how the foreground servers stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How the long-running commands log, to stderr.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Logs go to stderr at the level `$HANGAR_LOG` names (`debug`,
/// `hangar_api=debug,info`, ...; default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANGAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(match &cli.command {
        Command::Up(args) => args.log_format,
        _ => LogFormat::Text,
    });
    // A command that prints and ends stops quietly when its reader goes
    // away (`hangar status --json | grep -q ...`), as Unix tools do. Not
    // the long-running ones: they write to sockets and pipes of their own.
    let prints_and_ends = match &cli.command {
        Command::Status(_) | Command::Releases(_) | Command::Logs { .. } | Command::Apps { .. } => {
            true
        }
        Command::Image(_) => true,
        Command::Machine(m) => !m.is_shim(),
        _ => false,
    };
    if prints_and_ends {
        // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Image(args) => image::run(args),
        Command::Registry(args) => registry::run(args),
        Command::Up(args) => up::run(args),
        Command::Node { command } => node::run(command),
        Command::Auth {
            command: AuthCommand::Token { command },
        } => registry::token(command),
        Command::Auth {
            command:
                AuthCommand::RegistryLogin {
                    registry,
                    username,
                    password_stdin,
                },
        } => apps::registry_login(&registry, &username, password_stdin),
        Command::Auth {
            command: AuthCommand::RegistryLogins,
        } => apps::registry_logins(),
        Command::Auth {
            command: AuthCommand::RegistryLogout { registry },
        } => apps::registry_logout(&registry),
        Command::Edge(args) => edge::run(args),
        Command::Egress(args) => egress::run(args),
        Command::Machine(args) => machine::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Launch(args) => apps::launch(args),
        Command::Deploy(args) => apps::deploy(args),
        Command::Status(app) => apps::status(app),
        Command::Releases(app) => apps::releases(app),
        Command::Logs { app, follow } => apps::logs(app, follow),
        Command::Scale { app, command } => apps::scale(app, command),
        Command::Secrets { app, command } => apps::secrets(app, command),
        Command::Cache { app, command } => apps::cache(app, command),
        Command::Metrics { command } => metrics::run(command),
        Command::Dashboard(args) => dashboard::dashboard(args),
        Command::Alerts(args) => dashboard::alerts(args),
        Command::Proxy(args) => tunnel::run(args),
        Command::Ssh { command } => ssh::run(command),
        Command::Console(args) => ssh::console_machine(args),
        Command::Apps { json, command } => apps::apps(json, command),
        Command::Open(app) => apps::open(app),
        Command::Apply(args) => apply::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hangar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
